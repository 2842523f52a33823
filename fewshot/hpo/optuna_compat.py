"""The one place that reaches into Optuna below its public API: heartbeats on the journal file,
on a database server that goes away for a moment, and one worker (not all) failing a stale trial.

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
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

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


class SteadyHeartbeatRDBStorage(RDBStorage):
    """RDBStorage whose heartbeat skips a beat while the database server is unreachable.
    Optuna's heartbeat thread ends at the first error, after which other workers would fail
    this live trial as stale once the grace period passes, however short the outage was."""

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
