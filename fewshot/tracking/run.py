"""One MLflow run: starting, resuming or nesting it, and the Tracker that logs into it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fewshot import plots
from fewshot.evaluate import per_class_accuracy
from fewshot.tracking.models import log_torch_model
from fewshot.tracking.queries import HOST_TAG, PID_TAG, param_text, reap_dead_runs
from fewshot.tracking.store import PROJECT_ROOT, configure, redact, tracking_uri

_STEP_TAGS: ContextVar[dict[str, Any] | None] = ContextVar("fewshot_step_tags", default=None)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Logging for one MLflow run; the training loops only see its callbacks."""

    FLUSH_SECONDS = 5.0

    def __init__(self, run: mlflow.ActiveRun) -> None:
        self.run_id = run.info.run_id
        self.client = MlflowClient()
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        fresh = {k: param_text(v)[:6000] for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow.set_tags({k: param_text(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_step_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics, buffered and written in batches (a SQLite write per epoch
        would cost more than a small model's epoch)."""
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def log_new_steps(self, steps: Iterable[tuple[int, dict[str, float]]], logged: set[int]) -> None:
        """Log each (step, metrics) whose step is not in ``logged`` yet, then flush: a resumed run
        replays its checkpoint's history without logging a step twice, and a step is in the store
        before the checkpoint that follows it."""
        for step, metrics in steps:
            if step not in logged:
                self.log_step_metrics(metrics, step=step)
                logged.add(step)
        self.flush()

    def new_step_logger(
        self, logged: set[int], then: Callable[[int, dict[str, float]], None] | None = None
    ) -> Callable[[int, dict[str, float]], None]:
        """A per-step callback for a training loop: ``log_new_steps`` of that one step, then ``then``."""

        def log(step: int, metrics: dict[str, float]) -> None:
            self.log_new_steps([(step, metrics)], logged)
            if then is not None:
                then(step, metrics)

        return log

    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000], synchronous=True)
        self._pending = []
        self._last_flush = time.monotonic()

    def epoch_logger(self, prefix: str = ""):
        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.log_step_metrics({prefix + k: v for k, v in metrics.items()}, step=epoch)

        return on_epoch

    def log_figure(self, fig, path: str) -> None:
        mlflow.log_figure(fig, path)
        plots.close(fig)

    def log_dict(self, data: Any, path: str) -> None:
        mlflow.log_dict(data, path)

    def log_text(self, text: str, path: str) -> None:
        mlflow.log_text(text, path)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        mlflow.log_artifact(str(local_path), artifact_dir)

    def log_draw(self, draw, source: str) -> None:
        """The labeled draw: indices as an artifact and an MLflow dataset input."""
        self.log_dict(draw.to_dict(), "data/labeled_draw.json")
        indices = np.concatenate([draw.train_idx.numpy(), draw.val_idx.numpy()])
        split = np.array([0] * len(draw.train_idx) + [1] * len(draw.val_idx))
        with warnings.catch_warnings():  # integer columns and a local path source are what we mean
            warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
            warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
            dataset = mlflow.data.from_numpy(
                indices, targets=split, source=source, name=f"mnist-labels-seed{draw.seed}-{draw.digest}"
            )
            try:
                mlflow.log_input(dataset, context="labeled")
            except MlflowException as exc:
                # two workers logging the same draw at once on a database server: the loser's insert
                # of the shared dataset row fails; the row exists now, so a second call links it
                if not re.search(r"duplicate key|unique constraint|duplicate entry", str(exc), re.IGNORECASE):
                    raise
                mlflow.log_input(dataset, context="labeled")
        self.set_tags({"draw_digest": draw.digest})

    def log_evaluation(self, prefix: str, topk: dict[int, float], matrix: torch.Tensor, title: str) -> None:
        """Top-1..5, per-class accuracy and the confusion matrix (PNG and CSV)."""
        self.log_metrics({f"{prefix}_top{k}": v for k, v in topk.items()})
        per_class = per_class_accuracy(matrix)
        self.log_metrics({f"{prefix}_acc_class{d}": float(a) for d, a in enumerate(per_class)})
        rows = ["true\\pred," + ",".join(str(i) for i in range(matrix.shape[1]))]
        rows += [f"{i}," + ",".join(str(int(v)) for v in row) for i, row in enumerate(matrix)]
        self.log_text("\n".join(rows) + "\n", f"evaluation/{prefix}_confusion_matrix.csv")
        self.log_figure(plots.confusion_figure(matrix, title), f"evaluation/{prefix}_confusion_matrix.png")

    def log_checkpoint(self, path: str | Path) -> None:
        self.log_file(path, "checkpoints")

    def log_torch_model(self, model: torch.nn.Module, name: str, spec: dict[str, Any]) -> str:
        """Log ``model`` into this run (see ``models.log_torch_model``); returns its model URI."""
        return log_torch_model(model, name, spec)


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Iterator[Tracker]:
    """Start (or resume, with ``run_id``) a run; it ends FINISHED, FAILED, or KILLED on Ctrl-C.

    Started while another run is active in this thread (a workflow step), it nests under it.
    The first top-level run of a job launched by ``mlflow run`` is the run MLflow created
    (MLFLOW_RUN_ID); MLflow consumes that variable, so later top-level runs are new ones.
    """
    if mlflow.active_run() is not None:
        nested = True
    elif parent_run_id is None:  # under `mlflow run`, the first run started here is the one it created
        configure(experiment, run_id=run_id)
        if tags and tags.get("job"):  # an earlier attempt of this job killed with SIGKILL stays RUNNING
            with contextlib.suppress(MlflowException):
                reap_dead_runs(job=str(tags["job"]))
    kwargs: dict[str, Any] = {"run_name": run_name, "nested": nested}
    if run_id is not None:
        kwargs = {"run_id": run_id, "nested": nested}
    if parent_run_id is not None:
        kwargs["parent_run_id"] = parent_run_id
    # the owner's pid and host are written with the run itself: a SIGKILL right after creation
    # must not leave a RUNNING run that reap_dead_runs cannot attribute
    run = mlflow.start_run(**kwargs, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
    tracker = Tracker(run)
    try:
        base_tags = {"git_commit": git_commit(), "tracking_uri": redact(tracking_uri())}
        tracker.set_tags({**base_tags, **(_STEP_TAGS.get() or {}), **(tags or {})})
        try:
            yield tracker
        finally:
            tracker.flush()
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


@contextlib.contextmanager
def step_tags(tags: dict[str, Any]) -> Iterator[None]:
    """Add ``tags`` to every run started inside the block (a workflow marks its step runs)."""
    token = _STEP_TAGS.set({**(_STEP_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _STEP_TAGS.reset(token)
