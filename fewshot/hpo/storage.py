"""Where a study lives: Optuna storage URLs, dead-worker detection, and creating a study once.

Two local kinds, measured in the README: SQLite (``sqlite:///path.db``, the default, beside
the MLflow store) and Optuna's journal file (``journal:///path.log`` or a path ending in
``.log``). Any SQLAlchemy URL (``postgresql://``, ``mysql://``) works for several machines.

A worker killed mid-trial leaves its trial RUNNING. Every storage here records a heartbeat
for running trials; a trial whose heartbeat is older than the grace period is failed by the
next worker that starts a trial, and re-queued with the same parameters (at most
``MAX_RETRY`` times). RDBStorage has this built in; the journal file does not (Optuna 5.0),
so ``HeartbeatJournalStorage`` adds the same protocol on top of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

from fewshot import tracking
from fewshot.errors import UserError

HEARTBEAT_ATTR = "fewshot:heartbeat"
MAX_RETRY = 2
GRACE_HEARTBEATS = 3  # a trial whose heartbeat is this many intervals old belongs to a dead worker
JOURNAL_PREFIX = "journal://"
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


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


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus the heartbeat protocol RDBStorage has (Optuna's own
    ``HeartbeatThread`` and ``fail_stale_trials`` drive it): the heartbeat is a trial system
    attribute holding the writer's wall-clock time."""

    def __init__(
        self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int, stale_callback: StaleCallback
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is not None and now - float(beat) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback

    def get_failed_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback


def open_storage(
    url: str, heartbeat_interval: int = 10, grace_period: int | None = None, on_stale: StaleCallback | None = None
) -> BaseStorage:
    """An Optuna storage for ``url`` with heartbeat and retry of stale trials.

    ``on_stale(study, trial)`` runs after a stale trial was failed and re-queued (the
    tracking side uses it to close the dead trial's MLflow run). Raises UserError when the
    storage cannot be opened.
    """
    grace = grace_period or GRACE_HEARTBEATS * heartbeat_interval
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def stale_callback(study: optuna.Study, trial: FrozenTrial) -> None:
        retry(study, trial)
        if on_stale is not None:
            on_stale(study, trial)

    path = journal_path(url)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path) + ".lock"))
            return HeartbeatJournalStorage(backend, heartbeat_interval, grace, stale_callback)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # SQLite: wait up to a minute for a writer's lock; servers: drop dead pooled connections
        engine_kwargs: dict[str, Any] = (
            {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        )
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


class SteadyHeartbeatRDBStorage(RDBStorage):
    """RDBStorage whose heartbeat skips a beat while the database server is unreachable.
    Optuna's heartbeat thread ends at the first error, after which other workers would fail
    this live trial as stale once the grace period passes, however short the outage was."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, SQLAlchemyError):
            pass  # the next beat tries again; an outage longer than the grace period still reads as a dead worker

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        return stale + [t for t in self._never_beaten_trial_ids(study_id) if t not in stale]

    def _never_beaten_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials without a single heartbeat, started two grace periods ago: their worker
        died between creating the trial and its first beat (the database went away right then).
        Optuna skips trials without a heartbeat, so they would stay RUNNING for ever."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        limit = datetime.now() - timedelta(seconds=2 * (self.grace_period or 2 * (self.heartbeat_interval or 0)))
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        old = [t._trial_id for t in running if t.datetime_start is not None and t.datetime_start < limit]
        if not old:
            return []
        with _create_scoped_session(self.scoped_session, True) as session:
            beaten = session.query(models.TrialHeartbeatModel.trial_id).filter(
                models.TrialHeartbeatModel.trial_id.in_(old)
            )
            have_beat = {row[0] for row in beaten}
        return [trial_id for trial_id in old if trial_id not in have_beat]


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
    optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        echo(f"waiting up to {wait} s for {len(running)} running trial(s) of other workers: a dead worker's "
             "trial is failed and re-queued once its heartbeat is stale")  # fmt: skip
    while running and time.monotonic() < deadline:
        time.sleep(min(1.0, heartbeat_interval))
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


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
