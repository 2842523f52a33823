"""HPO worker processes sharing one study: 4 on SQLite (one SIGKILLed mid-trial) and 2 on a
real PostgreSQL server on 127.0.0.1. Every trial is recorded once, every child run is nested
under a worker's parent run, no worker sees a lock error, nothing is left RUNNING."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from fewshot.hpo.storage import open_storage
from tests.hpo_helpers import LOCKED, freeze_mid_trial, write_encoder_checkpoint
from tests.reliability.conftest import all_runs, child_env, finish, running, start_job

LOCK_ERRORS = re.compile(r"database is locked|deadlock|could not serialize|OperationalError|Traceback", re.I)


def worker(study: str, data_dir: Path, encoder: Path, n_trials: int, env: dict, cwd: Path, *extra: str):
    args = ["--target", "linear", "--study-name", study, "--n-trials", str(n_trials), "--folds", "2",
            "--budget", "40", "--data-dir", str(data_dir), "--encoder", str(encoder), "--pruner", "none",
            "--heartbeat", "1", *extra]  # fmt: skip
    return start_job("entrypoints.hpo", *args, env=env, cwd=cwd)


def observe_study(db: Path, name: str, deadline: float) -> optuna.Study:
    """The study as an observer sees it, once a worker has created it. Opened once, read-only
    in spirit, with a short lock timeout so a worker frozen inside a write cannot hang the test."""
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
                if conn.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone():
                    break
        except sqlite3.OperationalError:  # no file or no schema yet, or locked
            pass
        time.sleep(0.1)
    storage = RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 2}})
    return optuna.load_study(study_name=name, storage=storage)


def check_study(study: optuna.Study, store: str, n_trials: int, workers: int) -> None:
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= n_trials
    runs = [r for r in all_runs(store) if r.data.tags.get("optuna.study_name") == study.study_name]
    parents = {r.info.run_id for r in runs if r.data.tags.get("job") == "hpo"}
    children = [r for r in runs if r.data.tags.get("job") == "hpo-trial"]
    assert len(parents) == workers
    by_trial = sorted(int(c.data.tags["optuna.trial_number"]) for c in children)
    started = sorted(t.number for t in trials if t.state != TrialState.WAITING)
    assert by_trial == started, "each started trial has exactly one child run"
    assert all(c.data.tags.get("mlflow.parentRunId") in parents for c in children), "every child nested"
    for trial in trials:
        if trial.state != TrialState.WAITING:
            assert trial.user_attrs["mlflow_run_id"] in {c.info.run_id for c in children}
    assert not running(store), running(store)


def test_four_sqlite_workers_one_killed_mid_trial(synthetic_data_dir: Path, fresh_store, tmp_path: Path) -> None:
    store = fresh_store("store")
    storage = f"sqlite:///{tmp_path / 'store' / 'optuna.db'}"
    encoder = write_encoder_checkpoint(tmp_path / "encoder.pt", width=4)
    env = child_env(store)
    procs = [worker("four", synthetic_data_dir, encoder, 10, env, tmp_path) for _ in range(4)]
    # SIGKILL whichever worker is first seen running a trial; the other three finish the study
    by_pid = {str(p.pid): p for p in procs}
    deadline = time.monotonic() + 180
    observer = observe_study(tmp_path / "store" / "optuna.db", "four", deadline)
    victim, victim_trial = None, None
    while victim is None and time.monotonic() < deadline:
        try:
            trials = observer.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except LOCKED:  # a worker holds the write lock; look again
            trials = []
        runs = {r.info.run_id: r for r in all_runs(store)} if trials else {}
        for trial in trials:
            run = runs.get(trial.user_attrs.get("mlflow_run_id", ""))
            proc = by_pid.get(run.data.tags.get("fewshot.pid", "")) if run else None
            if proc is not None and proc.poll() is None and freeze_mid_trial(proc, observer, trial.number):
                # frozen between ending the trial's run and telling Optuna is not mid-trial: the run must be open
                frozen_run = {r.info.run_id: r for r in all_runs(store)}.get(run.info.run_id)
                if frozen_run is None or frozen_run.info.status != "RUNNING":
                    os.kill(proc.pid, signal.SIGCONT)
                    continue
                victim, victim_trial = proc, trial.number
                break
        time.sleep(0.05)
    assert victim is not None, "no worker was seen running a trial"
    os.kill(victim.pid, signal.SIGKILL)
    finish(victim)
    survivors = [p for p in procs if p is not victim]
    outputs = [finish(p) for p in survivors]
    for proc, out in zip(survivors, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
        assert not LOCK_ERRORS.search(out), out[-3000:]
    assert sum("(created)" in out for out in outputs) <= 1
    study = optuna.load_study(study_name="four", storage=storage)
    dead = study.trials[victim_trial]
    assert dead.state == TrialState.FAIL, "the killed worker's trial is detected (heartbeat) and failed"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim_trial]
    assert len(retries) == 1 and dead.params.items() <= retries[0].params.items(), "the retry repeats what was drawn"
    check_study(study, store, 10, workers=4)
    runs = {r.info.run_id: r for r in all_runs(store)}
    assert runs[dead.user_attrs["mlflow_run_id"]].info.status == "FAILED"


def test_two_workers_on_a_real_postgresql_server(postgres, synthetic_data_dir: Path, fresh_store, tmp_path: Path):
    store = fresh_store("store")
    encoder = write_encoder_checkpoint(tmp_path / "encoder.pt", width=4)
    env = child_env(store)
    procs = [worker("pg", synthetic_data_dir, encoder, 6, env, tmp_path, "--storage", postgres.url) for _ in range(2)]
    outputs = [finish(p) for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
        assert not LOCK_ERRORS.search(out), out[-3000:]
        assert "s3cret-pw" not in out, "the storage password is redacted in what a worker prints"
    assert sum("(created)" in out for out in outputs) == 1
    study = optuna.load_study(study_name="pg", storage=postgres.url.replace("postgresql://", "postgresql+psycopg2://"))
    check_study(study, store, 6, workers=2)
    for run in all_runs(store):
        assert "s3cret-pw" not in str(run.data.params) + str(run.data.tags), "no password in params or tags"


def test_the_storage_rides_out_a_postgresql_restart(postgres) -> None:
    """A worker's storage calls wait for a database server that went away for a moment (up to
    optuna_compat.OUTAGE_SECONDS) instead of failing inside Optuna."""
    storage = open_storage(postgres.url, heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name=f"outage-{os.getpid()}-{time.time_ns()}")
    study_id = storage.get_study_id_from_name(study.study_name)
    trial = study.ask()
    postgres.server.stop("fast")
    restart = threading.Timer(3.0, postgres.server.start)
    restart.start()
    try:
        started = time.monotonic()
        study.tell(trial, 0.5)  # the database is down for the first seconds of this call
        waited = time.monotonic() - started
    finally:
        restart.join(60)
    assert waited >= 2.0, "the call met the outage"
    assert [t.value for t in storage.get_all_trials(study_id)] == [0.5]
