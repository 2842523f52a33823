"""The only module that talks to MLflow: store location, runs, logging, models, registry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
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
warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways.*")
logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format caution: see log_torch_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STORE_DIR = PROJECT_ROOT / "mlruns"
DEFAULT_EXPERIMENT = "fewshot"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
PID_TAG = "fewshot.pid"
HOST_TAG = "fewshot.host"
_STEP_TAGS: ContextVar[dict[str, Any] | None] = ContextVar("fewshot_step_tags", default=None)


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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when an http(s) tracking server does not answer: MLflow's own client
    retries with backoff for minutes (measured: 4 min 20 s for http://127.0.0.1:9)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(
            f"tracking store {redact(uri)} cannot be reached ({reason}); start the tracking server "
            f"(mlflow server --host 127.0.0.1 --port <port>) or fix {TRACKING_ENV}"
        ) from exc


def configure(experiment: str | None = None) -> str:
    """Point MLflow at the store, create it on first use, select the experiment.

    Returns the experiment id. Raises UserError when the store cannot be reached.
    """
    uri = tracking_uri()
    check_reachable(uri)
    redirected_from = None
    if os.environ.get("MLFLOW_RUN_ID") and _launched_with_implicit_store():
        redirected_from = (os.environ[TRACKING_ENV], os.environ.pop("MLFLOW_RUN_ID"))
    if uri == default_tracking_uri():
        STORE_DIR.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    launched_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID") if os.environ.get("MLFLOW_RUN_ID") else None
    try:
        client = MlflowClient()
        found = client.get_experiment_by_name(name)
        if launched_experiment:  # `mlflow run` created the run in this experiment: stay in it
            experiment_id = launched_experiment
        elif found is None:
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
    """Start (or resume, with ``run_id``) a run; it ends FINISHED, FAILED, or KILLED on Ctrl-C.

    Started while another run is active in this thread (a workflow step), it nests under it.
    """
    if mlflow.active_run() is not None:
        nested = True
    elif parent_run_id is None:
        configure(experiment)
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
        base_tags = {"git_commit": git_commit(), "tracking_uri": redact(mlflow.get_tracking_uri())}
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


# ---------------------------------------------------------------- model registry

CHAMPION = "champion"
CHALLENGER = "challenger"
SCORE_TAG = "val_score"


def _version_score(client: MlflowClient, name: str, version: str) -> float | None:
    tags = client.get_model_version(name, version).tags
    try:
        return float(tags[SCORE_TAG])
    except (KeyError, ValueError):
        return None


def register_model_version(
    model_uri: str, name: str, score: float, tags: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Register ``model_uri`` as a new version of ``name`` and give it an alias.

    ``score`` is the validation measure (higher is better, labeled training data only),
    stored as the version tag ``val_score``. The new version takes the ``champion`` alias
    when there is no champion or it beats the champion's score; otherwise it becomes the
    ``challenger``. Returns (version, alias).
    """
    client = MlflowClient()
    score = round(score, 6)  # compared as stored: a tie with the champion's tag is not a win
    all_tags = {key: _param_text(value) for key, value in {**(tags or {}), SCORE_TAG: f"{score:.6f}"}.items()}
    version = mlflow.register_model(model_uri, name, tags=all_tags).version
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_score = _version_score(client, name, champion.version)
    except MlflowException:
        champion, champion_score = None, None
    if champion is None or champion_score is None or score > champion_score:
        alias = CHAMPION
    else:
        alias = CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return version, alias


# ---------------------------------------------------------------- reading logged models back

MODEL_URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<model name>"
_REGISTRY_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_REGISTRY_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_LOGGED_MODEL_ID = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
_RUN_MODEL = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def is_mlflow_uri(text: str) -> bool:
    return text.startswith(("models:", "runs:"))


def _registry_hint(client: MlflowClient, name: str) -> str:
    """What exists under ``name``: its aliases and versions, or the registered model names."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=20)]
        if not names:
            return "no model is registered in this store yet: run `mlflow run . -e moco_pretrain` or pass a checkpoint file"
        return f"registered models here: {', '.join(names)}"
    aliases = ", ".join(f"@{alias} -> {version}" for alias, version in sorted((model.aliases or {}).items()))
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'", max_results=200))
    listed = ", ".join(str(v) for v in versions) or "none"
    return f"{name} has aliases {aliases or 'none'} and versions {listed}; try models:/{name}@champion or models:/{name}/<version>"


def _resolve_model_uri(client: MlflowClient, uri: str) -> tuple[str, str | None, str | None, str | None]:
    """(download URI pinned to a version, registered name, version, source run id)."""
    if match := _REGISTRY_ALIAS.match(uri):
        name = match["name"]
        found = client.get_model_version_by_alias(name, match["alias"])
        return f"models:/{name}/{found.version}", name, str(found.version), found.run_id
    if match := _REGISTRY_VERSION.match(uri):
        name = match["name"]
        found = client.get_model_version(name, match["version"])
        return uri, name, str(found.version), found.run_id
    if _LOGGED_MODEL_ID.match(uri):
        return uri, None, None, None
    if match := _RUN_MODEL.match(uri):
        client.get_run(match["run_id"])  # a clear "Run ... not found" before the download
        return uri, None, None, match["run_id"]
    raise UserError(f"{uri}: not a model URI this project reads; use {MODEL_URI_FORMS}, or a checkpoint file path")


@dataclass(frozen=True)
class FetchedModel:
    """A logged model's files downloaded to ``local_dir``, with where they came from."""

    uri: str
    local_dir: Path
    registered_name: str | None
    version: str | None
    run_id: str | None


def fetch_model_files(
    uri: str, dst: str | Path, option: str = "--encoder", store_uri: str | None = None
) -> FetchedModel:
    """Download the files of the MLflow model at ``uri`` (registry alias or version, logged model
    id, or run URI) into ``dst`` without loading (unpickling) it.

    An alias is resolved to its version first, so the files and the reported version agree even
    if the alias moves meanwhile. Unknown names, versions, aliases and runs raise UserError with
    MLflow's message and what exists instead. ``store_uri`` defaults to the project's store.
    """
    uri = uri.strip()
    store = store_uri or tracking_uri()
    check_reachable(store)
    mlflow.set_tracking_uri(store)
    client = MlflowClient(tracking_uri=store)
    try:
        pinned, name, version, run_id = _resolve_model_uri(client, uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(dst), tracking_uri=store)
    except MlflowException as exc:
        hint = "check the run id in the MLflow UI" if uri.startswith("runs:") else ""
        match = _REGISTRY_ALIAS.match(uri) or _REGISTRY_VERSION.match(uri)
        if match is not None:
            with contextlib.suppress(Exception):
                hint = _registry_hint(client, match["name"])
        if uri.startswith("runs:") and "Failed to download" in str(exc):
            hint = "check the model name after the run id (moco_pretrain logs it as 'encoder')"
        raise UserError(f"{option} {uri}: {_first_line(exc)}" + (f"; {hint}" if hint else "")) from exc
    except UserError as exc:  # a malformed URI
        raise UserError(f"{option} {exc}") from exc
    except Exception as exc:  # connection errors from requests / sqlalchemy
        raise UserError(
            f"{option} {uri}: the tracking store {redact(store)} cannot be read ({type(exc).__name__}); "
            f"check {TRACKING_ENV}"
        ) from exc
    local_dir = Path(local)
    if run_id is None:
        run_id = _mlmodel_run_id(local_dir)
    return FetchedModel(uri=uri, local_dir=local_dir, registered_name=name, version=version, run_id=run_id)


def _mlmodel_run_id(model_dir: Path) -> str | None:
    path = model_dir / "MLmodel"
    if not path.is_file():
        return None
    match = re.search(r"^run_id:\s*(\S+)\s*$", path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


# ---------------------------------------------------------------- run states and lookups (HPO)


def set_run_status(run_id: str, status: str, tags: dict[str, Any] | None = None) -> None:
    """Tag a run and end it with ``status`` (FINISHED, FAILED or KILLED), from any thread or process."""
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, _param_text(value))
    client.set_terminated(run_id, status)


def run_state(run_id: str) -> tuple[str, dict[str, str]] | None:
    """(status, tags) of a run, or None when it does not exist."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return run.info.status, dict(run.data.tags)


def running_runs(experiment_id: str, tags: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the RUNNING runs of an experiment carrying all ``tags``."""
    clauses = ["attributes.status = 'RUNNING'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = MlflowClient().search_runs([experiment_id], " and ".join(clauses), max_results=1000)
    return [(run.info.run_id, dict(run.data.tags)) for run in runs]


def find_model_version(name: str, tags: dict[str, str]) -> tuple[str, list[str]] | None:
    """(version, its aliases) of the first version of ``name`` carrying all ``tags``, or None."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=1000)
    except MlflowException:
        return None
    for version in versions:
        if all(version.tags.get(k) == v for k, v in tags.items()):
            aliases = [
                a
                for a, v in (client.get_registered_model(name).aliases or {}).items()
                if str(v) == str(version.version)
            ]
            return str(version.version), aliases
    return None


# ---------------------------------------------------------------- workflow support


@contextlib.contextmanager
def step_tags(tags: dict[str, Any]) -> Iterator[None]:
    """Add ``tags`` to every run started inside the block (a workflow marks its step runs)."""
    token = _STEP_TAGS.set({**(_STEP_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _STEP_TAGS.reset(token)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_runs(job: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (on this host) is gone, e.g. after SIGKILL.

    Returns their ids. Runs from other hosts, or without our pid tag, are left alone; with
    ``job``, only runs tagged ``job = <job>`` are considered (a job's top-level start reaps its
    own dead attempts; HPO trial runs have their own heartbeat protocol).
    """
    client = MlflowClient()
    host = socket.gethostname()
    reaped = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = "attributes.status = 'RUNNING'" + (f" and tags.job = '{job}'" if job else "")
    for run in client.search_runs(experiments, filter_string=query, max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if int(tags[PID_TAG]) != os.getpid() and not pid_alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            reaped.append(run.info.run_id)
    return reaped


def find_finished_run(tag: str, value: str) -> str | None:
    """The newest FINISHED run carrying ``tag = value``, in any experiment."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments,
        filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_summary(run_id: str) -> dict[str, Any]:
    """Status, name, params, metrics and tags of one run, as plain dicts."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"run {run_id}: {_first_line(exc)} in {redact(mlflow.get_tracking_uri())}; check the run id "
            f"(--parent-run-id) in the MLflow UI or {TRACKING_ENV}"
        ) from exc
    return {
        "run_id": run_id,
        "status": run.info.status,
        "run_name": run.info.run_name,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def latest_run_id(tag: str, value: str) -> str | None:
    """The newest run (any status) carrying ``tag = value``."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments, filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0].info.run_id if found else None


def download_artifact(run_id: str, path: str, destination: str | Path) -> Path:
    return Path(MlflowClient().download_artifacts(run_id, path, str(destination)))


# ---------------------------------------------------------------- resumed runs (moco_pretrain)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` is already logged in ``run_id`` (a resumed run skips them)."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def run_status(run_id: str) -> str | None:
    """The run's status (``RUNNING``, ``FINISHED``, ``KILLED``, ...), None when this store lacks it."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def run_exists(run_id: str) -> bool:
    return run_status(run_id) is not None


def checkpoint_root() -> Path:
    """Where workflow steps keep their checkpoints: beside the SQLite store in use (the project's
    ``mlruns/`` by default), else under ``mlruns/checkpoints/<hash of the store URI>``."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent / "checkpoints"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return STORE_DIR / "checkpoints" / digest
