"""The loop side of a resumable job: checkpoint files and stopping at a step boundary (no MLflow)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fewshot.checkpoints import save_atomic
from fewshot.interrupts import StopAtStepBoundary


def config_for_checkpoint(params: dict[str, Any]) -> dict[str, Any]:
    """A config's params with tuples as lists: what ``torch.load(weights_only=True)`` reads back."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


@dataclass
class CheckpointWriter:
    """Writes one job's checkpoint file: the loop's state plus the format and version it is read back
    with, the config a resume is checked against, and the job's extras (its MLflow run id).

    ``path`` None writes nothing (a plain call without checkpoints, or a worker process).
    ``on_write(path)`` runs after each write.
    """

    path: Path | None
    format: str
    version: int
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    on_write: Callable[[Path], None] | None = None

    def write(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        save_atomic({"format": self.format, "version": self.version, **state, "config": self.config, **self.extra},
                    self.path)  # fmt: skip
        if self.on_write is not None:
            self.on_write(Path(self.path))


class StepBoundary:
    """What a resumable loop checks between two steps: is a checkpoint due (``minutes`` since the
    last one, or Ctrl-C / SIGTERM arrived), and should it stop now that the checkpoint is written.

    Use as a context manager around the loop: inside it a signal only sets a flag (a second one
    interrupts at once), so the loop stops with a consistent checkpoint. ``enabled`` false: signals
    interrupt at once (several processes must stop at the same step).
    """

    def __init__(self, minutes: float = 0.0, enabled: bool = True) -> None:
        self.minutes = minutes
        self._signals = StopAtStepBoundary(enabled=enabled)
        self._last_write = time.monotonic()

    def __enter__(self) -> StepBoundary:
        self._signals.__enter__()
        self._last_write = time.monotonic()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._signals.__exit__(kind, exc, tb)

    @property
    def stop_requested(self) -> bool:
        return self._signals.requested is not None

    def checkpoint_due(self) -> bool:
        """A signal asked to stop, or ``minutes`` (> 0) have passed since the last checkpoint."""
        timed = self.minutes > 0 and time.monotonic() - self._last_write >= self.minutes * 60
        return timed or self.stop_requested

    def written(self) -> None:
        """A checkpoint was just written: the timer restarts."""
        self._last_write = time.monotonic()

    def stop_if_requested(self) -> None:
        """Raise ``KeyboardInterrupt`` when a signal arrived (the caller has checkpointed)."""
        self._signals.raise_if_requested()
