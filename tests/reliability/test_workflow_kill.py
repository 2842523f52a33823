"""The `main` workflow SIGKILLed midway, then rerun with the same command (quick profile, one
draw, synthetic digits): the steps that had finished are reused, the killed workflow run is
marked KILLED, the rerun finishes and writes the report, and nothing is left RUNNING."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from tests.reliability.conftest import all_runs, child_env, finish, running, start_job

STEP_TAG = "fewshot.step"


def test_main_killed_midway_reuses_finished_steps_on_rerun(synthetic_data_dir: Path, fresh_store, tmp_path: Path):
    store = fresh_store("store")
    args = ["--quick", "true", "--draws", "1", "--data-dir", str(synthetic_data_dir), "--results-dir", str(tmp_path)]
    proc = start_job("entrypoints.main", *args, env=child_env(store), cwd=tmp_path)
    wanted = random.Random(os.environ.get("FEWSHOT_FAULT_SEED")).randint(2, 3)  # kill after 2 or 3 steps
    deadline = time.monotonic() + 300
    done: list = []
    while time.monotonic() < deadline and proc.poll() is None:
        done = [r for r in all_runs(store) if r.data.tags.get(STEP_TAG) and r.info.status == "FINISHED"]
        if len(done) >= wanted:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the workflow finished before the kill: " + finish(proc)[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    finished_before = {r.data.tags[STEP_TAG] for r in all_runs(store) if r.data.tags.get(STEP_TAG)
                       and r.info.status == "FINISHED"}  # fmt: skip
    (killed,) = [r.info.run_id for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags
                 and r.info.status == "RUNNING" and r.info.run_name.startswith("workflow")]  # fmt: skip

    rerun = start_job("entrypoints.main", *args, env=child_env(store), cwd=tmp_path)
    out = finish(rerun, timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    reused = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("[reuse]")}
    assert finished_before <= reused, (finished_before, out[-3000:])
    assert f"marked run {killed} KILLED" in out
    statuses = {r.info.run_id: r.info.status for r in all_runs(store)}
    assert statuses[killed] == "KILLED"
    assert not running(store), running(store)
    assert (tmp_path / "results.md").is_file()
    # the profile's probe settings: the linear head under the strong view, kNN on plain features
    augment = {r.data.tags[STEP_TAG]: r.data.params.get("augment") for r in all_runs(store)
               if r.data.tags.get(STEP_TAG, "").startswith("linear_eval-") and r.info.status == "FINISHED"}  # fmt: skip
    assert augment == {"linear_eval-linear-draw0": "strong", "linear_eval-knn-draw0": "none",
                       "linear_eval-finetune-draw0": "strong"}  # fmt: skip
