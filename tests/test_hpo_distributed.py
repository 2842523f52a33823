"""``hpo --target moco`` under torchrun with two CPU processes (gloo): optuna-integration's
TorchDistributedTrial carries each trial's parameters, reports and pruning decisions to the
second process, which trains every trial with rank 0; rank 0 alone records the study and runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow import MlflowClient

from fewshot.hpo.trials import RUN_ATTR
from tests.conftest import PROJECT_ROOT
from tests.reliability.conftest import child_env


def test_moco_trials_train_on_two_torchrun_processes(synthetic_data_dir: Path, tracking_store: str, tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.hpo_ddp_worker", str(synthetic_data_dir), storage, str(tmp_path)]  # fmt: skip
    env = child_env(tracking_store, PYTHONPATH=str(PROJECT_ROOT))
    # cwd: the store's relative artifact root (./mlruns) lands in the test's folder, not the project's
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    leader, follower = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert leader["world"] == follower["world"] == 2
    assert not leader["follower"] and follower["follower"] and follower["parent_run_id"] is None
    assert leader["trials_run"] == follower["trials_run"] == 2, (leader, follower)
    study = optuna.load_study(study_name="ddp", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = MlflowClient(tracking_store)
    for trial in study.trials:  # one child run per trial, made by rank 0, under its parent run
        run = client.get_run(trial.user_attrs[RUN_ATTR])
        assert run.data.tags["mlflow.parentRunId"] == leader["parent_run_id"]
        assert "loo_knn_accuracy" in run.data.metrics
