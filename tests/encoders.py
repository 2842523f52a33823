"""Tiny pretrained-looking encoders for the probe tests: as a checkpoint file or a registered model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fewshot.models import build_encoder

ENCODER_NAME = "fewshot-moco-encoder"
WIDTH = 8


def tiny_encoder(seed: int = 0, width: int = WIDTH) -> nn.Module:
    """A width-8 DigitEncoder with seeded weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    encoder = build_encoder("digit", width)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


def write_checkpoint(path: Path, encoder: nn.Module, width: int = WIDTH, **extra) -> Path:
    payload = {
        "format": "fewshot-moco-checkpoint",
        "version": 1,
        "encoder_spec": {"arch": "digit", "width": width},
        "encoder_state": encoder.state_dict(),
        "epoch": 3,
        "optimizer": {"state": {}, "param_groups": []},
        **extra,
    }
    torch.save(payload, path)
    return path


def log_encoder(encoder: nn.Module, score: float) -> tuple[str, str, str]:
    """Log ``encoder`` as moco_pretrain does and register it; returns (run_id, version, alias)."""
    from fewshot import tracking

    with tracking.start_run(run_name="fake-moco", tags={"job": "moco_pretrain"}) as tracker:
        spec = {"kind": "encoder", "arch": "digit", "width": WIDTH, "feature_dim": encoder.feature_dim}
        uri = tracker.log_torch_model(encoder, "encoder", spec)
    version, alias = tracking.register_model_version(uri, ENCODER_NAME, score)
    return tracker.run_id, version, alias


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
