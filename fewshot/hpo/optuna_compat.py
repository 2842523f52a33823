"""The one place that reaches into Optuna below its public API: heartbeats on the journal file,
storage calls and heartbeats through a database server that goes away for a moment, and one
worker (not all) failing a stale trial.

RDBStorage records trial heartbeats and fails stale trials out of the box. Optuna's journal
storage does not (checked up to ``CHECKED_OPTUNA``), and the only way to give it the same
protocol is to implement ``optuna.storages._heartbeat.BaseHeartbeat``, whose abstract method
``_get_stale_trial_ids`` is private. Optuna's own ``HeartbeatThread`` and the public
``optuna.storages.fail_stale_trials`` then drive it exactly as they drive RDBStorage.

``tests/test_optuna_compat.py`` asserts the names and signatures used here, and pins the Optuna
versions they were checked against: a release that changes them fails that test first.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, PendingRollbackError, SQLAlchemyError

# Optuna releases whose private heartbeat interface this module was read against
CHECKED_OPTUNA = ("4.9", "5.0", "5.1")
HEARTBEAT_ATTR = "fewshot:heartbeat"  # trial system attribute: the writer's wall-clock time
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage plus the heartbeat protocol RDBStorage has: a running trial's
    heartbeat is a trial system attribute; a trial whose heartbeat is older than
    ``grace_period`` seconds is stale."""

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
                # the storage's own id, found through its public lookup by number
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback


OUTAGE_SECONDS = 30.0  # how long a storage call on a database server waits for it to come back
# the storage calls a worker makes (Optuna's public storage API); the heartbeat has its own handling
RIDE_OUT = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
    "_get_stale_trial_ids",
    # what Optuna's _CachedStorage, which wraps every RDBStorage a study uses, calls instead (private)
    "_set_trial_param", "_create_new_trial", "_get_trials", "_get_best_trial_id",
)  # fmt: skip


def connection_lost(exc: BaseException) -> bool:
    """A refused, dropped or invalidated database connection somewhere in ``exc``'s chain (a
    server restart, a network cut), as opposed to a constraint or a bad query."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OperationalError, InterfaceError, DisconnectionError, PendingRollbackError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _riding_out_outages(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: SteadyHeartbeatRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + (OUTAGE_SECONDS if self.rides_out_outages else 0.0)
        while True:
            try:
                return method(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as exc:
                if not connection_lost(exc) or time.monotonic() >= deadline:
                    raise
                self.remove_session()  # a session whose connection died cannot be rolled back; start afresh
                time.sleep(1.0)

    return call


class SteadyHeartbeatRDBStorage(RDBStorage):
    """RDBStorage that rides out a database server going away for a moment.

    On a server (not SQLite, whose locks have their own timeout) every storage call that meets a
    lost connection is retried for up to ``OUTAGE_SECONDS``, so a worker carries on through a
    restart instead of dying inside Optuna (where a failed ``tell`` surfaced as an
    UnboundLocalError, and one inside the sampler as StorageInternalError). The heartbeat skips
    a beat meanwhile: Optuna's heartbeat thread ends at the first error, after which other
    workers would fail this live trial as stale once the grace period passed."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.rides_out_outages = not url.startswith("sqlite")

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, SQLAlchemyError):
            pass  # the next beat tries again; an outage longer than the grace period still reads as a dead worker

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        """Failing a RUNNING trial is a compare-and-set: when several workers find the same stale
        trial at once, one fails it and the others get UpdateFinishedTrialError, as Optuna's
        fail_stale_trials expects. Optuna reads the state with SELECT ... FOR UPDATE, which
        SQLite ignores, so without this every worker wins and each queues a retry."""
        if state != TrialState.FAIL or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            changed = (
                session.query(models.TrialModel)
                .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.RUNNING)
                .update({"state": TrialState.FAIL, "datetime_complete": datetime.now()}, synchronize_session=False)
            )
        # not RUNNING: finished (Optuna raises UpdateFinishedTrialError) or WAITING (Optuna's own path)
        return True if changed else super().set_trial_state_values(trial_id, state, values)

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


for _name in RIDE_OUT:
    setattr(SteadyHeartbeatRDBStorage, _name, _riding_out_outages(getattr(SteadyHeartbeatRDBStorage, _name)))
