"""Device, precision, threads and seeding, chosen in one place.

Precision. ``--precision auto`` runs the convolutions and matrix products under bf16 autocast
where the hardware does bf16 natively (a CPU with AMX or AVX-512 BF16; CUDA, where the GPU path
always ran under bf16 autocast) and in plain fp32 elsewhere; ``fp32`` and ``bf16`` force one.
Under bf16 the weights, optimizer state, batch-norm statistics, losses, the MoCo queue and
every moving average stay fp32 (autocast only lowers the inputs of the ops it lists); the
fp32 path is the code path as it was before precision became a choice, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fewshot.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
# "1" / "0" overrides the CPU's answer to "native bf16?" (tests; a CPU the detector misjudges)
NATIVE_BF16_ENV = "FEWSHOT_NATIVE_BF16"
# the CPU features that make bf16 convolutions and matmuls fast in oneDNN (AMX tiles, AVX-512 BF16)
NATIVE_BF16_FEATURES = ("amx_bf16", "avx512_bf16")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX or AVX-512 BF16); ``$FEWSHOT_NATIVE_BF16``
    (1 or 0) overrides the detection."""
    override = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    if override:
        raise UserError(f"${NATIVE_BF16_ENV}={override!r}: set it to 1 (native bf16), 0 (none) or unset it")
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(bool(capabilities.get(feature)) for feature in NATIVE_BF16_FEATURES)


def check_precision(requested: str) -> None:
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested}: choose one of {', '.join(PRECISIONS)}")


def resolve_precision(requested: str, device: torch.device | str, native_bf16: bool | None = None) -> str:
    """``fp32`` or ``bf16`` for ``requested`` on ``device``; ``native_bf16`` overrides the CPU check."""
    check_precision(requested)
    if requested != "auto":
        return requested
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16"  # what the GPU path has always done
    if kind == "cpu":
        return "bf16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "fp32"
    return "fp32"


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device type: the autocast context and the memory layout that go with it."""

    name: str  # "fp32" or "bf16"
    device_type: str = "cpu"

    @classmethod
    def choose(cls, requested: str, device: torch.device | str) -> Precision:
        return cls(resolve_precision(requested, device), torch.device(device).type)

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward passes (and the losses computed from them); under fp32 a
        disabled autocast, which changes nothing."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)


FP32 = Precision("fp32")


def precision_context(precision: Precision | None) -> contextlib.AbstractContextManager:
    """``precision.autocast()``, or nothing at all for None (the callers that never choose)."""
    return precision.autocast() if precision is not None else contextlib.nullcontext()


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
