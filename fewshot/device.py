"""Device, precision, threads and seeding, chosen in one place."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` moved to ``device`` (in place) with its convolution weights channels-last: on
    1x28x28 digits the CPU convolutions then run about 2x faster in inference and a fifth to a
    quarter faster in training (README, *Measured figures*); the outputs agree to 1e-7."""
    return model.to(device=device, memory_format=torch.channels_last)


def configure_threads() -> None:
    """Use every core for intra-op work (the CPU default is sometimes half); respect an
    explicit OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that drives shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
