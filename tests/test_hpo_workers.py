"""HPO with several worker processes: two workers started at once on a fresh store and one
study, and a worker killed with SIGKILL mid-trial whose study a rerun completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import PROJECT_ROOT
from tests.hpo_helpers import LOCKED, freeze_mid_trial, load, storage_url, study_runs, write_encoder_checkpoint


def _worker(study: str, data_dir: Path, encoder: Path, n_trials: int, *extra: str) -> subprocess.Popen:
    args = ["--target", "linear", "--study-name", study, "--n-trials", str(n_trials), "--folds", "3",
            "--data-dir", str(data_dir), "--encoder", str(encoder), "--pruner", "none", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return subprocess.Popen(
        [sys.executable, "-m", "entrypoints.hpo", *args], cwd=PROJECT_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_workers_share_one_study(synthetic_data_dir: Path, tracking_store: str, tmp_path: Path) -> None:
    """Both start at the same moment on a store that does not exist yet (the init lock makes
    one of them create it); together they reach the study's total, trial numbers unique."""
    encoder = write_encoder_checkpoint(tmp_path / "encoder.pt")
    procs = [_worker("shared", synthetic_data_dir, encoder, 6, "--budget", "15") for _ in range(2)]
    outputs = [_finish(p) for p in procs]
    assert sum("(created)" in out for out in outputs) == 1
    study = load("shared", storage_url(tracking_store))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) >= 6
    runs = study_runs("shared")
    parents = {r.info.run_id for r in runs if r.data.tags.get("job") == "hpo"}
    children = [r for r in runs if r.data.tags.get("job") == "hpo-trial"]
    assert len(parents) == 2
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == sorted(numbers)
    assert all(c.data.tags["mlflow.parentRunId"] in parents for c in children)
    assert all(r.info.status != "RUNNING" for r in runs)


def _freeze_worker_mid_trial(study_name: str, storage: str, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll until the worker runs a trial, then freeze it (SIGSTOP) inside that trial: the trial
    number to kill it in. No timing assumption: trials may take 0.1 s or 10 s."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            "the worker finished before it was seen in a trial: " + proc.communicate()[0][-3000:]
        )
        try:
            study = study or load(study_name, storage)
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if "mlflow_run_id" in trial.user_attrs and freeze_mid_trial(proc, study, trial.number):
                    return trial.number
        except KeyError:  # the study does not exist yet
            pass
        except LOCKED:  # the worker holds the write lock; look again
            pass
        time.sleep(0.02)
    pytest.fail("no trial started in time")


def test_killed_worker_trial_is_failed_and_retried(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    encoder = write_encoder_checkpoint(tmp_path / "encoder.pt")
    storage = storage_url(tracking_store)
    # many trials, so the worker is still busy when seen; it is frozen inside one, then killed
    doomed = _worker("killed", synthetic_data_dir, encoder, 100, "--budget", "100", "--heartbeat", "1")
    number = _freeze_worker_mid_trial("killed", storage, doomed)
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.communicate(timeout=30)
    time.sleep(3.5)  # past the grace period: the dead trial's heartbeat is stale
    target = number + 2  # the rerun has trials left to run: the dead one's retry among them
    _finish(_worker("killed", synthetic_data_dir, encoder, target, "--budget", "100", "--heartbeat", "1"))
    study = load("killed", storage)
    dead = study.trials[number]
    assert dead.state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert len(retries) == 1 and dead.params.items() <= retries[0].params.items(), "the retry repeats what was drawn"
    assert retries[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) >= target
    runs = {r.info.run_id: r for r in study_runs("killed")}
    assert all(r.info.status != "RUNNING" for r in runs.values()), "no run left RUNNING after the rerun"
    dead_run = runs[dead.user_attrs["mlflow_run_id"]]
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["optuna.trial_state"] == "FAIL"
    assert runs[dead_run.data.tags["mlflow.parentRunId"]].info.status == "FAILED"
    retry_run = runs[retries[0].user_attrs["mlflow_run_id"]]
    assert retry_run.data.tags["optuna.retry_of_trial"] == str(number)
