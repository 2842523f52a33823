"""Where a study lives: Optuna storage URLs, dead-worker detection, and creating a study once.

Two local kinds, measured in the README: SQLite (``sqlite:///path.db``, the default, beside
the MLflow store) and Optuna's journal file (``journal:///path.log`` or a path ending in
``.log``). Any SQLAlchemy URL (``postgresql://``, ``mysql://``) works for several machines.

A worker killed mid-trial leaves its trial RUNNING. Every storage here records a heartbeat
for running trials; a trial whose heartbeat is older than the grace period is failed by the
next worker that starts a trial, and re-queued with the same parameters (at most
``MAX_RETRY`` times). RDBStorage has this built in; the journal file does not, so
``optuna_compat.HeartbeatJournalStorage`` adds the same protocol on top of it.

The journal file is opened exactly as Optuna's own ``JournalFileBackend(path)`` opens it (its
default lock, ``<path>.lock``), so optuna-dashboard or a user's script on the same file take
the same lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError

from fewshot import tracking
from fewshot.errors import UserError
from fewshot.hpo.optuna_compat import HeartbeatJournalStorage, StaleCallback, SteadyHeartbeatRDBStorage

MAX_RETRY = 2
GRACE_HEARTBEATS = 3  # a trial whose heartbeat is this many intervals old belongs to a dead worker
JOURNAL_PREFIX = "journal://"


@contextlib.contextmanager
def experimental_ok() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning for the calls inside only (heartbeat retry,
    fail_stale_trials, TPE's multivariate mode): those APIs are what this package chose to use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def default_storage_url() -> str:
    """SQLite beside the MLflow store when that is a SQLite file, else under the project's mlruns/."""
    uri = tracking.tracking_uri()
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else tracking.STORE_DIR
    return f"sqlite:///{folder / 'optuna.db'}"


def journal_path(url: str) -> Path | None:
    """The journal file of a ``journal:///path`` URL or a bare ``*.log`` path; None for a database URL."""
    if url.startswith(JOURNAL_PREFIX):
        return Path(url[len(JOURNAL_PREFIX) :]).expanduser()
    if "://" not in url and url.endswith((".log", ".journal")):
        return Path(url).expanduser()
    return None


def with_driver(url: str) -> str:
    """``postgresql://`` names the psycopg (3) driver in SQLAlchemy 2.1; use psycopg2 when only it is installed."""
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def describe(url: str) -> str:
    return "journal" if journal_path(url) is not None else url.split(":", 1)[0].split("+", 1)[0]


def open_storage(
    url: str, heartbeat_interval: int = 10, grace_period: int | None = None, on_stale: StaleCallback | None = None
) -> BaseStorage:
    """An Optuna storage for ``url`` with heartbeat and retry of stale trials.

    ``on_stale(study, trial)`` runs after a stale trial was failed and re-queued (the
    tracking side uses it to close the dead trial's MLflow run). Raises UserError when the
    storage cannot be opened.
    """
    grace = grace_period or GRACE_HEARTBEATS * heartbeat_interval
    with experimental_ok():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def stale_callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retry(study, trial)
        if on_stale is not None:
            on_stale(study, trial)

    path = journal_path(url)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path))  # Optuna's default lock: every client of the file shares it
            return HeartbeatJournalStorage(backend, heartbeat_interval, grace, stale_callback)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # SQLite: wait up to a minute for a writer's lock; servers: drop dead pooled connections
        engine_kwargs: dict[str, Any] = (
            {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        )
        with experimental_ok():
            return _rdb_storage(
                with_driver(url),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=stale_callback,
            )
    except Exception as exc:  # sqlalchemy / driver / OS errors come in many types
        text = str(exc).strip().splitlines()
        raise UserError(
            f"--storage {tracking.redact(url)}: cannot open the Optuna storage ({type(exc).__name__}: "
            f"{text[0][:200] if text else ''}); pass a sqlite:///, postgresql://, mysql:// or journal:/// URL "
            "that this machine can reach"
        ) from exc


def _rdb_storage(url: str, **kwargs: Any) -> RDBStorage:
    """The first worker to reach an empty database creates Optuna's tables; workers on other
    hosts starting at the same moment collide with it and open it once it is done."""
    for pause in (1.0, 2.0):
        try:
            return SteadyHeartbeatRDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError):  # a duplicate type or table
            time.sleep(pause)
    return SteadyHeartbeatRDBStorage(url, **kwargs)


def settle_dead_trials(study: optuna.Study, heartbeat_interval: int, echo: Callable[[str], None]) -> None:
    """Before a worker leaves: wait, at most a grace period and one heartbeat, until no trial is RUNNING, failing
    (and re-queueing) those whose heartbeat went stale. Otherwise a worker killed near the end of
    a study leaves its trial RUNNING, with no worker left to notice."""
    wait = (GRACE_HEARTBEATS + 1) * heartbeat_interval
    deadline = time.monotonic() + wait
    fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        echo(f"waiting up to {wait} s for {len(running)} running trial(s) of other workers: a dead worker's "
             "trial is failed and re-queued once its heartbeat is stale")  # fmt: skip
    while running and time.monotonic() < deadline:
        time.sleep(min(1.0, heartbeat_interval))
        fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's public ``fail_stale_trials`` (experimental): fail and re-queue trials of dead workers."""
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def init_lock(*keys: str) -> Iterator[None]:
    """A host-wide lock around creating stores: two processes creating one fresh SQLite
    database at the same moment crash in schema migration. Several machines pointing at one
    server database should create the study once first (``--n-trials 0``)."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fewshot-hpo-init-{digest}.lock"
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
