"""Stopping a training loop at a step boundary when Ctrl-C or SIGTERM arrives.

A signal that lands inside ``optimizer.step()`` or a checkpoint write would leave the model
half-updated; the loop instead polls ``stop.requested`` after each step, writes a consistent
checkpoint and then raises ``KeyboardInterrupt`` (the entry points turn it into a KILLED run
and exit 130). A second signal interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopAtStepBoundary:
    """Context manager deferring SIGINT/SIGTERM to the loop's next ``raise_if_requested``.

    A no-op outside the main thread (signal handlers live there; HPO threads keep Python's
    behaviour) and when ``enabled`` is false (several processes must stop at the same step,
    so under torchrun a signal interrupts at once).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopAtStepBoundary:
        if self.enabled:
            self._saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.requested = signum

    def raise_if_requested(self) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"signal {self.requested}")
