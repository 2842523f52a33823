"""Which MLflow store a job logs to, creating it safely, and where job state lives beside it.

One rule, MLflow's own: ``MLFLOW_TRACKING_URI`` when set (``mlflow run`` sets it for its job;
``http://``, ``postgresql://`` and ``sqlite:///`` all work), else MLflow's default
``sqlite:///mlflow.db`` in the working folder, with artifacts under ``./mlruns``. So ``mlflow
run .``, ``python -m entrypoints.<job>``, ``make run`` and ``mlflow ui`` started in the project
root meet in one store. Only ``configure`` (a job opening its store) aligns MLflow's
process-wide tracking URI with MLFLOW_TRACKING_URI when the variable was changed after
``mlflow.set_tracking_uri``; nothing else here changes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.rest_utils import MlflowHostCreds, http_request

from fewshot.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STORE_DIR = PROJECT_ROOT / "mlruns"  # job state for stores that are not a local SQLite file
DEFAULT_EXPERIMENT = "fewshot"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
SQLITE_PREFIX = "sqlite:///"
# a quick answer when the user has not tuned MLflow's HTTP client: its defaults retry for minutes
PROBE_RETRIES, PROBE_TIMEOUT_S = 1, 5


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the store MLflow resolves (``sqlite:///<cwd>/mlflow.db`` by default).

    ``mlflow.set_tracking_uri`` writes the variable too, so the two differ only when the variable
    was changed after it: the later, explicit choice wins."""
    return os.environ.get(TRACKING_ENV) or mlflow.get_tracking_uri()


def default_tracking_uri() -> str:
    """MLflow's default store for this working folder (what ``mlflow ui`` here opens)."""
    return f"{SQLITE_PREFIX}{Path.cwd() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """Hide the password in ``scheme://user:password@host`` URIs before logging or printing."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", uri)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for any other store."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(urllib.parse.unquote(uri[len(SQLITE_PREFIX) :]).split("?", 1)[0])


def checkpoint_root() -> Path:
    """Where workflow steps keep their checkpoints: ``checkpoints/`` beside the SQLite store in use
    (the project root by default), else under ``mlruns/checkpoints/<hash of the store URI>``."""
    uri = tracking_uri()
    if (path := sqlite_path(uri)) is not None:
        return path.parent / "checkpoints"
    return STORE_DIR / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:12]


def check_reachable(uri: str) -> None:
    """Fail in seconds when an http(s) tracking server does not answer, through MLflow's own HTTP
    client (proxies, TLS settings, MLFLOW_HTTP_REQUEST_MAX_RETRIES and _TIMEOUT when set)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() if MLFLOW_HTTP_REQUEST_MAX_RETRIES.is_set() else PROBE_RETRIES
    timeout = MLFLOW_HTTP_REQUEST_TIMEOUT.get() if MLFLOW_HTTP_REQUEST_TIMEOUT.is_set() else PROBE_TIMEOUT_S
    try:  # any HTTP answer, even 401 or 404, means a server is there
        http_request(MlflowHostCreds(uri), "/health", "GET", max_retries=retries, backoff_factor=1, timeout=timeout)
    except Exception as exc:  # requests' connection errors, or MLflow's "max retries exceeded"
        raise UserError(
            f"tracking store {redact(uri)} cannot be reached ({type(exc).__name__}); start the tracking server "
            f"(mlflow server --host 127.0.0.1 --port <port>) or fix {TRACKING_ENV}"
        ) from exc


@contextlib.contextmanager
def creation_lock(uri: str) -> Iterator[None]:
    """A host-wide lock for a local SQLite store: processes that create or migrate one fresh
    database at the same moment otherwise fail in MLflow's schema migration."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"fewshot-mlflow-store-{digest}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_store(uri: str) -> MlflowClient:
    """A client on ``uri`` with its schema in place (created or migrated under ``creation_lock``)."""
    check_reachable(uri)
    path = sqlite_path(uri)
    try:
        if path is None:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
            return client
        if not path.parent.is_dir():
            raise UserError(
                f"tracking store {redact(uri)}: folder {path.parent} does not exist; create it or fix {TRACKING_ENV}"
            )
        with creation_lock(str(path.resolve())):  # MLflow creates and migrates the schema in the client
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except UserError:
        raise
    except MlflowException as exc:
        raise UserError(
            f"tracking store {redact(uri)} is not usable ({first_line(exc)}); check {TRACKING_ENV}"
        ) from exc
    except Exception as exc:  # a server or database that fails: say what failed, not "unreachable"
        raise UserError(
            f"tracking store {redact(uri)} failed: {type(exc).__name__}: {first_line(exc)}; check {TRACKING_ENV}"
        ) from exc
    return client


def launched_run_id() -> str | None:
    """The run ``mlflow run`` created for this job (it hands it over as MLFLOW_RUN_ID)."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def configure(experiment: str | None = None, run_id: str | None = None) -> str:
    """Open the store and select the experiment for the runs this process starts; returns its id.

    That is the experiment of ``run_id`` (a run being resumed), else under ``mlflow run`` that of
    the run MLflow created, which the job's first run continues; else ``experiment``,
    MLFLOW_EXPERIMENT_NAME or ``fewshot``, created on first use. Raises UserError, naming what
    failed, when the store cannot be used.
    """
    uri = tracking_uri()
    client = open_store(uri)
    if mlflow.get_tracking_uri() != uri:  # the job's runs go where its store was resolved
        mlflow.set_tracking_uri(uri)
    try:
        if (existing := run_id or launched_run_id()) is not None:
            experiment_id = client.get_run(existing).info.experiment_id
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            experiment_id = _experiment_id(client, name)
    except MlflowException as exc:
        raise UserError(
            f"tracking store {redact(uri)}: {first_line(exc)}; check {TRACKING_ENV} and the run id"
        ) from exc
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id
