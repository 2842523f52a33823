"""The Optuna compatibility module and the journal file: the private heartbeat interface it
relies on still has the shape it was written against (this fails first on an Optuna release
that changes it), a dead worker's journal trial is failed and re-queued, and the journal lock is
the one Optuna's own ``JournalFileBackend(path)`` takes."""

from __future__ import annotations

import inspect
import re
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from fewshot.hpo import optuna_compat
from fewshot.hpo.storage import experimental_ok, fail_stale_trials, open_storage


def test_optuna_is_a_version_the_compat_module_was_checked_against() -> None:
    major_minor = ".".join(optuna.__version__.split(".")[:2])
    assert major_minor in optuna_compat.CHECKED_OPTUNA, (
        f"Optuna {optuna.__version__} is new: read fewshot/hpo/optuna_compat.py against its "
        "optuna/storages/_heartbeat.py, then add it to CHECKED_OPTUNA"
    )


def test_the_private_heartbeat_interface_has_the_shape_used(tmp_path: Path) -> None:
    from optuna.storages import _heartbeat

    base = _heartbeat.BaseHeartbeat
    # the abstract methods HeartbeatJournalStorage implements, and no new ones
    assert base.__abstractmethods__ == {
        "record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback",
    }  # fmt: skip
    assert list(inspect.signature(base._get_stale_trial_ids).parameters) == ["self", "study_id"]
    assert list(inspect.signature(base.record_heartbeat).parameters) == ["self", "trial_id"]
    # what drives it: Optuna's heartbeat thread and the public fail_stale_trials both go by is_heartbeat_enabled
    assert _heartbeat.is_heartbeat_enabled(open_storage(f"journal:///{tmp_path / 'probe.log'}"))
    assert callable(_heartbeat.get_heartbeat_thread)


def test_every_storage_call_that_rides_out_an_outage_exists() -> None:
    """The RDBStorage methods wrapped to ride out a database restart, the private ones Optuna's
    _CachedStorage calls included: a release that renames one fails here, not in an outage."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    assert all(callable(getattr(RDBStorage, name, None)) for name in optuna_compat.RIDE_OUT)
    source = inspect.getsource(_CachedStorage)
    backend_calls = set(re.findall(r"self\._backend\.(\w+)\(", source))
    wrapped_elsewhere = {"record_heartbeat", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    assert backend_calls - wrapped_elsewhere <= set(optuna_compat.RIDE_OUT), backend_calls - set(optuna_compat.RIDE_OUT)


def test_a_dead_workers_journal_trial_is_failed_and_requeued(tmp_path: Path) -> None:
    stale_seen: list[int] = []
    storage = open_storage(
        f"journal:///{tmp_path / 'study.log'}", heartbeat_interval=1, grace_period=1,
        on_stale=lambda study, trial: stale_seen.append(trial.number),
    )  # fmt: skip
    assert isinstance(storage, optuna_compat.HeartbeatJournalStorage)
    study = optuna.create_study(storage=storage, study_name="dead-worker")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # a worker that then dies
    study_id = storage.get_study_id_from_name("dead-worker")
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.record_heartbeat(trial_id)
    fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING  # heartbeat fresh
    time.sleep(1.5)
    fail_stale_trials(study)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING] and stale_seen == [0]
    with experimental_ok():
        assert RetryHeartbeatStaleTrialCallback.retried_trial_number(study.trials[1]) == 0
    assert study.trials[1].params == study.trials[0].params


def test_the_journal_lock_is_the_one_optunas_own_backend_takes(tmp_path: Path) -> None:
    """Hold the lock as ``JournalFileBackend(path)`` (optuna-dashboard, a user's script) takes it:
    a write through this package's storage waits for it, and the file stays readable by plain Optuna."""
    path = tmp_path / "shared.log"
    storage = open_storage(f"journal:///{path}")
    optuna.create_study(storage=storage, study_name="first")
    other_client_lock = JournalFileSymlinkLock(str(path))  # what JournalFileBackend(str(path)) builds
    assert other_client_lock.acquire()
    written = threading.Event()

    def write() -> None:
        optuna.create_study(storage=storage, study_name="second")
        written.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert not written.wait(1.5), "the write did not wait for the lock another client holds"
    finally:
        other_client_lock.release()
    assert written.wait(30)
    writer.join(5)
    assert not (tmp_path / "shared.log.lock.lock").exists()
    plain = JournalStorage(JournalFileBackend(str(path)))
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(plain)) == ["first", "second"]


@pytest.mark.parametrize("url", ["journal:///{tmp}/j.log", "sqlite:///{tmp}/o.db"])
def test_every_storage_records_heartbeats(url: str, tmp_path: Path) -> None:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    assert is_heartbeat_enabled(open_storage(url.format(tmp=tmp_path)))


def fail_at_once(storages: list[optuna.storages.BaseStorage], trial_id: int) -> list[bool]:
    """Every storage (a worker) tries to fail the trial at the same moment; the successes."""
    gate, wins = threading.Barrier(len(storages)), []

    def fail(storage: optuna.storages.BaseStorage) -> None:
        gate.wait()
        try:
            wins.append(storage.set_trial_state_values(trial_id, TrialState.FAIL))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    threads = [threading.Thread(target=fail, args=(s,)) for s in storages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return wins


@pytest.mark.parametrize("url", ["journal:///{tmp}/j.log", "sqlite:///{tmp}/o.db"])
def test_workers_failing_one_stale_trial_at_once_queue_one_retry(url: str, tmp_path: Path) -> None:
    """Every worker runs fail_stale_trials before its next trial; when several see the same stale
    trial at once, exactly one may fail it, or each would queue a retry of it (SQLite ignores the
    SELECT ... FOR UPDATE that Optuna's RDBStorage relies on for this)."""
    url = url.format(tmp=tmp_path)
    storages = [open_storage(url) for _ in range(4)]
    study = optuna.create_study(storage=storages[0], study_name="race")
    study_id = storages[0].get_study_id_from_name("race")
    for _ in range(20):  # the race is a matter of timing: give it many chances
        number = study.ask().number
        trial_id = storages[0].get_trial_id_from_study_id_trial_number(study_id, number)
        wins = fail_at_once(storages, trial_id)
        assert wins == [True], f"trial {number}: {len(wins)} workers failed it"
