"""Logged models load where they are meant to be used: a fresh virtualenv built from the model's
own requirements.txt alone (no fewshot, no torchvision), through the registry aliases, and
through ``mlflow models predict``; the downstream snippet of docs/tracking.md runs there as written.

Building the virtualenv installs torch and mlflow (minutes: 12 on this two-core machine with pip's
cache cold); it is kept under ``$FEWSHOT_MODEL_ENV_CACHE`` (default ``~/.cache/fewshot/model-env``),
keyed by the requirements' hash, so later runs reuse it. Marked ``model_env``: CI runs it;
``-m "not model_env"`` skips it locally.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from fewshot import tracking
from fewshot.models import EncoderClassifier
from tests.conftest import PROJECT_ROOT
from tests.encoders import ENCODER_NAME, log_encoder, tiny_encoder

pytestmark = pytest.mark.model_env
CLASSIFIER_NAME = "fewshot-classifier"
ENV_CACHE = Path(os.environ.get("FEWSHOT_MODEL_ENV_CACHE", Path.home() / ".cache" / "fewshot" / "model-env"))

LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np
images = np.load(sys.argv[1])
out = {}
for uri in sys.argv[2:]:
    out[uri] = mlflow.pyfunc.load_model(uri).predict(images).tolist()
for absent in ("fewshot", "torchvision"):  # (mlflow itself brings scikit-learn)
    try:
        __import__(absent)
        out[absent] = "importable"
    except ImportError:
        pass
print(json.dumps(out))
"""


def model_env(requirements: Path) -> Path:
    """A virtualenv with exactly ``pip install -r requirements``: built once per requirements content."""
    lines = sorted(line.strip() for line in requirements.read_text().splitlines() if line.strip())
    folder = ENV_CACHE / hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable  # a base interpreter, not this project's venv
    subprocess.run([python, "-m", "venv", str(folder)], check=True, timeout=300)
    pip = subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "-r", str(requirements)],
                         capture_output=True, text=True, timeout=3600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    (folder / "requirements.txt").write_text("\n".join(lines) + "\n")
    (folder / ".complete").touch()
    return folder


def bare_env(store: str) -> dict[str, str]:
    """Only what a downstream user's shell would have: the store, no project paths."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "PATH", "TMPDIR", "PIP_FIND_LINKS")}
    return {**keep, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}


def log_classifier(score: float) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(3)
    classifier = EncoderClassifier(tiny_encoder(seed=5)).eval()
    spec = {"kind": "encoder_classifier", "arch": "digit", "width": 8, "feature_dim": 32, "num_classes": 10}
    with tracking.start_run(run_name="fake-semisup", tags={"job": "semisup"}) as tracker:
        uri = tracker.log_torch_model(classifier, "classifier", spec)
    version, _ = tracking.register_model_version(uri, CLASSIFIER_NAME, score)
    return classifier, version


def docs_snippet() -> str:
    """The downstream snippet of docs/tracking.md, as written there."""
    text = (PROJECT_ROOT / "docs" / "tracking.md").read_text()
    match = re.search(r"<!-- downstream snippet -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/tracking.md lost its downstream snippet"
    return match.group(1)


def test_logged_models_load_and_predict_in_a_fresh_virtualenv(tracking_store: str, tmp_path: Path) -> None:
    encoder = tiny_encoder(seed=7)
    log_encoder(encoder, score=0.8)
    classifier, version = log_classifier(score=0.5)
    uris = [f"models:/{ENCODER_NAME}@champion", f"models:/{ENCODER_NAME}/latest", f"models:/{CLASSIFIER_NAME}@champion"]
    requirements = {Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text() for uri in uris}
    assert len(requirements) == 1, requirements
    listed = sorted(re.split(r"[=<>!~ ]", line)[0] for line in requirements.pop().splitlines() if line.strip())
    assert listed == ["mlflow", "numpy", "torch"], listed
    for uri in uris:
        info = mlflow.models.get_model_info(uri)
        assert info.signature is not None and info.saved_input_example_info is not None, uri
        assert mlflow.models.Model.load(uri).load_input_example().shape[0] >= 2
    env_dir = model_env(Path(mlflow.pyfunc.get_model_dependencies(uris[0])))
    python = env_dir / "bin" / "python"

    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "images.npy", images.numpy())
    done = subprocess.run([str(python), "-c", LOAD_AND_PREDICT, str(tmp_path / "images.npy"), *uris], cwd=tmp_path,
                          env=bare_env(tracking_store), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not {"fewshot", "torchvision"} & set(out), out
    with torch.no_grad():
        features, scores = encoder(images).numpy(), classifier(images).numpy()
    np.testing.assert_allclose(np.array(out[uris[0]]), features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(out[uris[1]]), features, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(out[uris[2]]), scores, rtol=1e-4, atol=1e-5)

    # `mlflow models predict` in that environment returns the classifier's digits for a small file
    (tmp_path / "input.json").write_text(json.dumps({"inputs": images.numpy().tolist()}))
    cmd = [str(env_dir / "bin" / "mlflow"), "models", "predict", "-m", f"models:/{CLASSIFIER_NAME}@champion",
           "--env-manager", "local", "-i", "input.json", "-t", "json", "-o", "predictions.json"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=bare_env(tracking_store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = np.array(json.loads((tmp_path / "predictions.json").read_text())["predictions"])
    assert predictions.argmax(1).tolist() == scores.argmax(1).tolist()

    # the documented downstream snippet runs there as written
    done = subprocess.run([str(python), "-c", docs_snippet()], cwd=tmp_path, env=bare_env(tracking_store),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\(2, 32\)", done.stdout) and re.search(r"digits: \[\d, \d\]", done.stdout), done.stdout
