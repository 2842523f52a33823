"""A MoCo pretraining checkpoint: reading it back and checking it, RNG states, the encoder inside."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot.checkpoints import check_same_settings, load_checked
from fewshot.moco import MoCo
from fewshot.models import build_encoder
from fewshot.names import MOCO_CHECKPOINT_FORMAT, MOCO_CHECKPOINT_VERSION
from fewshot.pretrain.config import PretrainConfig

DEFAULT_CHECKPOINT_DIR = "checkpoints/moco"  # <dir>/<run name>/last.pt


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states in torch.load(weights_only=True)-safe types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a MoCo checkpoint; one-line UserError when missing or corrupt."""
    return load_checked(
        path, MOCO_CHECKPOINT_FORMAT, MOCO_CHECKPOINT_VERSION,
        ("encoder_spec", "encoder_state", "moco_state", "optimizer", "epoch", "step", "config"), "MoCo",
        f"; pass a checkpoint written by moco_pretrain ({DEFAULT_CHECKPOINT_DIR}/<run name>/last.pt) or --resume never",
    )  # fmt: skip


def check_resume_config(cfg: PretrainConfig, state: dict[str, Any]) -> None:
    check_same_settings(state["config"], cfg, PretrainConfig.RESUME_KEYS)


def encoder_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """A plain backbone rebuilt from a checkpoint's ``encoder_spec`` and ``encoder_state``."""
    spec = state["encoder_spec"]
    encoder = build_encoder(spec["arch"], spec["width"])
    encoder.load_state_dict(state["encoder_state"])
    return encoder.eval()


def plain_encoder(model: MoCo, arch: str, width: int) -> nn.Module:
    """The query backbone as a plain build_encoder module (split-BN back to BatchNorm2d), on CPU."""
    encoder = build_encoder(arch, width)
    encoder.load_state_dict({k: v.detach().float().cpu() for k, v in model.backbone_q.state_dict().items()})
    return encoder.eval()
