"""How a trained torch module becomes an MLflow model that loads anywhere.

The module is traced to TorchScript and logged with MLflow's pytorch flavor: loading it needs
torch, numpy and mlflow only (no fewshot code, no torchvision), in any process or virtualenv
built from the model's own ``requirements.txt``. ``mlflow.pytorch.load_model`` returns a module
(eval mode works), ``mlflow.pyfunc`` and ``mlflow models predict`` take a float32 batch
(N, 1, 28, 28) in [0, 1] (a head: (N, in_features)). A signature and a two-image input example
go with it; ``extra_files/spec.json`` and ``weights.pt`` (a plain state_dict) let this project
rebuild the eager module without running code from the file. (``torch.export``'s pt2 format is
the successor, but a module it loads refuses ``.eval()`` on torch 2.14.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

IMAGE_SHAPE = (1, 28, 28)
EXAMPLE_BATCH = 2  # a batch of one would let the signature pin the batch size


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Silence, for the calls inside only, what MLflow and torch print on every model save or
    download: the pickle-format caution (the file holds TorchScript, not pickled code), tracing
    and deprecation notices, and the artifact progress bar."""
    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def example_input(spec: dict[str, Any]) -> np.ndarray:
    """A fixed batch of inputs for ``spec``'s model: images, or features for a head."""
    shape = (int(spec["in_features"]),) if "in_features" in spec else IMAGE_SHAPE
    generator = torch.Generator().manual_seed(0)
    return torch.rand((EXAMPLE_BATCH, *shape), generator=generator).numpy()


def requirements() -> list[str]:
    """What loading the traced model needs (MLflow adds its own pin)."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy>={np.__version__.split('.')[0]}"]


def _trace(model: torch.nn.Module, example: np.ndarray) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.trace(model, torch.from_numpy(example), check_trace=False)


def log_torch_model(model: torch.nn.Module, name: str, spec: dict[str, Any]) -> str:
    """Log ``model`` (moved to the CPU, eval mode) into the active run as ``name``; returns its
    ``models:/<model id>`` URI."""
    model = model.cpu().eval()
    example = example_input(spec)
    with quiet_mlflow(), tempfile.TemporaryDirectory() as tmp:
        traced = _trace(model, example)
        with torch.no_grad():
            signature = infer_signature(example, traced(torch.from_numpy(example)).numpy())
        weights, spec_path = Path(tmp) / "weights.pt", Path(tmp) / "spec.json"
        torch.save(model.state_dict(), weights)
        spec_path.write_text(json.dumps(spec, indent=2))
        info = mlflow.pytorch.log_model(
            traced,
            name=name,
            serialization_format="pickle",  # for a ScriptModule this is torch.jit.save: no pickled code
            signature=signature,
            input_example=example,
            extra_files=[str(weights), str(spec_path)],
            pip_requirements=requirements(),
        )
    return info.model_uri
