"""The MLflow side of a resumable job: where it starts, its run, and what it logs at the end."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from torch import nn

from fewshot import tracking
from fewshot.checkpoints import resolve_resume
from fewshot.errors import UserError
from fewshot.safe_paths import path_component

RESUME_CHOICES = ("auto", "never")  # anything else given to --resume is a checkpoint path
Metrics = dict[str, float]
StepCallback = Callable[[int, Metrics], None]


@dataclass(frozen=True)
class JobStart:
    """Where a job starts: its run name, its checkpoint file and the state it continues (None: fresh)."""

    run_name: str
    checkpoint: Path
    state: dict[str, Any] | None

    @classmethod
    def resolve(
        cls,
        resume: str,
        run_name: str,
        checkpoint_dir: str | Path | None,
        default_dir: str,
        load: Callable[[str | Path], dict[str, Any]],
        check: Callable[[dict[str, Any]], None],
        redo_logging: bool = True,
    ) -> JobStart:
        """``resume``: ``auto`` (this run name's unfinished checkpoint under ``checkpoint_dir``, else
        ``default_dir``), ``never`` or a checkpoint path; ``check(state)`` refuses changed settings."""
        # the run name is a folder under the checkpoint folder: library callers are checked as the CLI is
        path = Path(checkpoint_dir or default_dir) / path_component("run_name", run_name) / "last.pt"
        state = resolve_resume(resume, path, load, redo_logging=redo_logging)
        if state is not None:
            check(state)
            if resume not in RESUME_CHOICES:
                path = Path(resume)
        return cls(run_name, path, state)

    @property
    def run_id(self) -> str | None:
        """The MLflow run the checkpoint belongs to (a resumed job continues it)."""
        return self.state.get("mlflow_run_id") if self.state else None


@dataclass(frozen=True)
class Registration:
    """Register the logged model as a version of ``name``, champion when ``score`` beats the champion's."""

    name: str
    score: float
    tags: dict[str, Any] = field(default_factory=dict)


class TrackedJob:
    """One job's MLflow run, opened fresh or reopened from ``start``'s checkpoint.

    ``step_metric`` is a metric the job logs at every history entry: a reopened run reads which
    steps have it to log each lost entry once (``begin``) and no entry twice (``step_logger``).
    """

    def __init__(self, start: JobStart, tags: dict[str, Any], step_metric: str) -> None:
        self.start = start
        self.tags = tags
        self.step_metric = step_metric
        self.started = time.perf_counter()
        self.logged: set[int] = set()
        self._open = contextlib.ExitStack()
        self.tracker: tracking.Tracker | None = None

    def __enter__(self) -> TrackedJob:
        run_id = self.start.run_id
        if run_id is not None:
            tracking.configure()
            if not tracking.run_exists(run_id):
                raise UserError(f"--resume: the checkpoint's MLflow run {run_id} is not in this tracking store; "
                                "point MLFLOW_TRACKING_URI at the store it came from or pass --resume never")  # fmt: skip
        self.started = time.perf_counter()
        with contextlib.ExitStack() as stack:  # a failure below still ends the run (FAILED)
            self.tracker = stack.enter_context(
                tracking.start_run(run_name=self.start.run_name, run_id=run_id, tags=self.tags)
            )
            self.logged = tracking.logged_steps(self.tracker.run_id, self.step_metric) if run_id else set()
            self._open = stack.pop_all()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        return self._open.__exit__(kind, exc, tb)

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def checkpoint_extra(self) -> dict[str, Any]:
        """What the job's checkpoints carry so that a resume finds this run."""
        return {"mlflow_run_id": self.run_id}

    def begin(self, log_fresh: Callable[[tracking.Tracker], None], history: Iterable[tuple[int, Metrics]]) -> None:
        """A fresh run: ``log_fresh(tracker)`` (params, the draw, figures). A resumed one: tag it and
        log the checkpoint's ``history`` entries whose logging was lost."""
        if self.start.state is None:
            log_fresh(self.tracker)
        else:
            self.tracker.set_tags({"resumed_from_step": self.start.state["step"]})
            self.tracker.log_new_steps(history, self.logged)

    def step_logger(self, then: StepCallback | None = None) -> StepCallback:
        """The loop's per-entry callback: log the entry once, then ``then(step, metrics)``."""
        return self.tracker.new_step_logger(self.logged, then)

    def elapsed(self) -> float:
        """Seconds since the run was opened (this session only)."""
        return time.perf_counter() - self.started

    def finish(
        self, model: nn.Module, name: str, spec: dict[str, Any], registration: Registration | None
    ) -> dict[str, Any]:
        """Log the checkpoint file and ``model`` (as ``name``); register it when asked. Returns the run
        id, model URI, checkpoint path and, when registered, the version and its alias."""
        self.tracker.log_checkpoint(self.start.checkpoint)
        model_uri = self.tracker.log_torch_model(model, name, spec)
        out: dict[str, Any] = {"run_id": self.run_id, "model_uri": model_uri, "checkpoint": str(self.start.checkpoint)}
        if registration is not None:
            version, alias = tracking.register_model_version(
                model_uri, registration.name, registration.score, registration.tags
            )
            self.tracker.set_tags({"registered_version": version, "registered_alias": alias})
            out.update(version=version, alias=alias)
        return out
