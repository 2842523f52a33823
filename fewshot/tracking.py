"""The only module that talks to MLflow: store location, runs, logging, models, registry."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fewshot import plots
from fewshot.errors import UserError

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore", message=".*Pickle or CloudPickle format.*")
warnings.filterwarnings("ignore", message=".*Hint: Inferred schema contains integer column.*")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STORE_DIR = PROJECT_ROOT / "mlruns"
DEFAULT_EXPERIMENT = "fewshot"
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    return f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def default_artifact_root() -> str:
    return (STORE_DIR / "artifacts").as_uri()


def redact(uri: str) -> str:
    """Hide the password in ``scheme://user:password@host`` URIs before logging or printing."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", uri)


def _ancestor_environ_lacks_tracking_uri() -> bool:
    """True when the process that launched ``mlflow run`` had no MLFLOW_TRACKING_URI.

    ``mlflow run`` hands its child the implicit default store (``sqlite:///<cwd>/mlflow.db``)
    as MLFLOW_TRACKING_URI; walking up to the first ancestor without MLFLOW_RUN_ID tells an
    implicit default from a user's explicit choice. Linux only; elsewhere the URI is kept.
    """
    pid = os.getppid()
    for _ in range(8):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        names = {entry.split(b"=", 1)[0] for entry in environ if entry}
        if b"MLFLOW_RUN_ID" not in names:
            return b"MLFLOW_TRACKING_URI" not in names
        match = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
        if match is None:
            return False
        pid = int(match.group(1))
    return False


def _launched_with_implicit_store() -> bool:
    uri = os.environ.get(TRACKING_ENV, "")
    return (
        bool(os.environ.get("MLFLOW_RUN_ID"))
        and uri.startswith("sqlite:///")
        and uri.endswith("/mlflow.db")
        and uri != default_tracking_uri()
        and _ancestor_environ_lacks_tracking_uri()
    )


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when the user set it, else the project's SQLite store."""
    explicit = os.environ.get(TRACKING_ENV)
    if explicit and not _launched_with_implicit_store():
        return explicit
    return default_tracking_uri()


def configure(experiment: str | None = None) -> str:
    """Point MLflow at the store, create it on first use, select the experiment.

    Returns the experiment id. Raises UserError when the store cannot be reached.
    """
    uri = tracking_uri()
    redirected_from = None
    if os.environ.get("MLFLOW_RUN_ID") and _launched_with_implicit_store():
        redirected_from = (os.environ[TRACKING_ENV], os.environ.pop("MLFLOW_RUN_ID"))
    if uri == default_tracking_uri():
        STORE_DIR.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        client = MlflowClient()
        found = client.get_experiment_by_name(name)
        if found is None:
            artifact_location = default_artifact_root() + f"/{name}" if uri == default_tracking_uri() else None
            try:
                experiment_id = client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another process created it first
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = found.experiment_id
    except MlflowException as exc:
        raise UserError(
            f"tracking store {redact(uri)} is not usable ({_first_line(exc)}); "
            f"check {TRACKING_ENV} or unset it to use {redact(default_tracking_uri())}"
        ) from exc
    except Exception as exc:  # connection errors from requests / sqlalchemy
        raise UserError(
            f"tracking store {redact(uri)} cannot be reached ({type(exc).__name__}); "
            f"check {TRACKING_ENV} or start the tracking server"
        ) from exc
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None) if redirected_from else None
    mlflow.set_experiment(experiment_id=experiment_id)
    if redirected_from is not None:
        _note_redirect(*redirected_from)
    return experiment_id


def _note_redirect(launcher_uri: str, launcher_run_id: str) -> None:
    with contextlib.suppress(Exception):
        MlflowClient(tracking_uri=launcher_uri).set_tag(
            launcher_run_id, "fewshot.logged_to", f"{redact(default_tracking_uri())} (project store)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_text(value: Any) -> str:
    return "" if value is None else str(value)


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
        fresh = {k: _param_text(v)[:6000] for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow.set_tags({k: _param_text(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_step_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics, buffered and written in batches (a SQLite write per epoch
        would cost more than a small model's epoch)."""
        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= self.FLUSH_SECONDS:
            self.flush()

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
        dataset = mlflow.data.from_numpy(
            indices, targets=split, source=source, name=f"mnist-labels-seed{draw.seed}-{draw.digest}"
        )
        mlflow.log_input(dataset, context="labeled")
        self.set_tags({"draw_digest": draw.digest})

    def log_evaluation(self, prefix: str, topk: dict[int, float], matrix: torch.Tensor, title: str) -> None:
        """Top-1..5, per-class accuracy and the confusion matrix (PNG and CSV)."""
        from fewshot.evaluate import per_class_accuracy

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
        """Log ``model`` so that ``mlflow.pytorch.load_model`` returns a working nn.Module in a
        fresh process, plus its weights and ``spec`` for loading without unpickling code.

        Pickle format with the library shipped as ``code_paths``: the loaded object is the
        eager module itself (no traced graph, no input example needed, any batch size works).
        """
        model = model.cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pt"
            torch.save(model.state_dict(), weights)
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec, indent=2))
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                code_paths=[str(PROJECT_ROOT / "fewshot")],
                extra_files=[str(weights), str(spec_path)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            )
        return info.model_uri


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
    nested: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Iterator[Tracker]:
    """Start (or resume, with ``run_id``) a run; it ends FINISHED, FAILED, or KILLED on Ctrl-C."""
    if not nested and parent_run_id is None:
        configure(experiment)
    kwargs: dict[str, Any] = {"run_name": run_name, "nested": nested}
    if run_id is not None:
        kwargs = {"run_id": run_id, "nested": nested}
    if parent_run_id is not None:
        kwargs["parent_run_id"] = parent_run_id
    run = mlflow.start_run(**kwargs)
    tracker = Tracker(run)
    try:
        base_tags = {"git_commit": git_commit(), "tracking_uri": redact(mlflow.get_tracking_uri())}
        tracker.set_tags({**base_tags, **(tags or {})})
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
