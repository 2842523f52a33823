"""Kill and resume with real signals on real processes.

``moco_pretrain`` is SIGKILLed during a checkpoint write (the temp file exists), during an
MLflow write (SQLite's rollback journal exists) and at a random moment, each time rerun
with the same command: the last rerun finishes in the same MLflow run with every epoch
logged exactly once and the metrics and weights of an uninterrupted run, bit for bit.
``baseline`` is SIGKILLed and simply rerun (it trains in seconds to minutes): same numbers,
the killed run ends KILLED. SIGTERM stops a run cleanly: exit 130, one line, run KILLED.
The kill points are drawn from a seed printed on failure (FEWSHOT_FAULT_SEED fixes it).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from tests.reliability.conftest import (
    all_runs,
    child_env,
    finish,
    kill_when,
    metric_histories,
    running,
    start_job,
)

SEED = int(os.environ.get("FEWSHOT_FAULT_SEED") or random.SystemRandom().randrange(10**6))
EPOCHS = 3


def moco_args(data_dir: Path, checkpoint_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--width", "4", "--epochs", str(EPOCHS), "--batch-size", "64",
        "--moco-k", "128", "--bn-splits", "4", "--checkpoint-dir", str(checkpoint_dir), "--run-name", run_name,
        "--checkpoint-minutes", "0.00001", "--no-progress", *extra,
    ]  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def checkpoint_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".last.pt.*.tmp")] if folder.is_dir() else []


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def compare_to_reference(store: str, run_id: str, ref_store: str, ref_id: str) -> None:
    got, want = metric_histories(store, run_id), metric_histories(ref_store, ref_id)
    assert set(got) == set(want)
    for key, points in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], f"{key}: steps duplicated or missing"
        assert got[key] == points, f"{key}: resumed values differ from the uninterrupted run"


def test_moco_pretrain_survives_sigkill_during_checkpoint_write_mlflow_write_and_at_random(
    synthetic_data_dir: Path, fresh_store, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    note = f"(FEWSHOT_FAULT_SEED={SEED})"
    ref_store, store = fresh_store("reference"), fresh_store("faulted")
    journal = Path(store[len("sqlite:///") :] + "-journal")
    reference = start_job(
        "entrypoints.moco_pretrain", *moco_args(synthetic_data_dir, tmp_path / "ck-ref", "ref"),
        env=child_env(ref_store), cwd=tmp_path,
    )  # fmt: skip
    folder = tmp_path / "ck"
    last = folder / "faulted" / "last.pt"
    args = moco_args(synthetic_data_dir, folder, "faulted")
    env = child_env(store)

    def attempt(condition) -> tuple[bool, str]:
        proc = start_job("entrypoints.moco_pretrain", *args, env=env, cwd=tmp_path)
        killed = kill_when(proc, condition)
        return killed, finish(proc)

    # 1. during a checkpoint write: the temp file is there, the rename has not happened
    kills = []
    killed, out = attempt(lambda: checkpoint_temp_files(folder / "faulted"))
    kills.append(("checkpoint write", killed))

    # 2. during an MLflow write, after this attempt's first checkpoint (an epoch's metrics or a tag)
    before = mtime(last)
    armed = []

    def in_mlflow_write() -> bool:
        if not armed and mtime(last) != before:
            armed.append(True)
        return bool(armed) and journal.exists()

    killed, out = attempt(in_mlflow_write)
    kills.append(("mlflow write", killed))

    # 3. at a random moment: a random time into the k-th step after this attempt resumed
    before, k, delay = mtime(last), rng.randint(1, 4), rng.uniform(0.0, 0.25)
    seen: list = [before]
    fired: list[float] = []

    def random_moment() -> bool:
        now = mtime(last)
        if not fired and now != seen[-1]:
            seen.append(now)
            if len(seen) > k:
                fired.append(time.monotonic())
        return bool(fired) and time.monotonic() - fired[0] >= delay

    killed, out = attempt(random_moment)
    kills.append((f"{delay:.2f} s after the {k}th checkpoint", killed))

    final = start_job("entrypoints.moco_pretrain", *args, env=env, cwd=tmp_path)
    out = finish(final)
    assert final.returncode == 0, f"{note} {kills}\n{out[-3000:]}"
    assert sum(k for _, k in kills) >= 2, f"{note} most attempts finished before their kill: {kills}"
    ref_out = finish(reference)
    assert reference.returncode == 0, ref_out[-3000:]

    runs = sorted((r for r in all_runs(store) if r.info.run_name == "faulted"), key=lambda r: r.info.start_time)
    statuses = [(r.info.run_id, r.info.status) for r in runs]
    assert not running(store), f"{note} runs left RUNNING: {running(store)}"
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in runs), f"{note} {statuses}"
    run = runs[-1]
    assert run.info.status == "FINISHED", f"{note} {statuses}"
    (ref_run,) = [r for r in all_runs(ref_store) if r.info.run_name == "ref"]
    # an attempt whose kill came after it had finished its run is a complete run too: all must match
    for done in (r for r in runs if r.info.status == "FINISHED"):
        compare_to_reference(store, done.info.run_id, ref_store, ref_run.info.run_id)

    state = torch.load(last, map_location="cpu", weights_only=True)
    ref_state = torch.load(tmp_path / "ck-ref" / "ref" / "last.pt", map_location="cpu", weights_only=True)
    assert state["finished"] and state["step"] == ref_state["step"] and state["mlflow_run_id"] == run.info.run_id
    for key, value in ref_state["encoder_state"].items():
        assert torch.equal(state["encoder_state"][key], value), f"{note} {key} differs"
    assert MlflowClient(store).list_artifacts(run.info.run_id, "checkpoints"), "final checkpoint logged"


def test_baseline_rerun_after_sigkill_equals_the_uninterrupted_run(
    synthetic_data_dir: Path, fresh_store, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    ref_store, store = fresh_store("reference"), fresh_store("faulted")
    args = ["--data-dir", str(synthetic_data_dir), "--model", "mlp1", "--epochs", "40", "--batch-size", "25",
            "--refit", "true", "--run-name", "b"]  # fmt: skip
    reference = start_job("entrypoints.baseline", *args, env=child_env(ref_store), cwd=tmp_path)
    victim = start_job("entrypoints.baseline", *args, env=child_env(store), cwd=tmp_path)
    journal = Path(store[len("sqlite:///") :] + "-journal")
    writes = rng.randint(2, 10)  # kill during the n-th MLflow write once the run exists
    counted: list[int] = []

    def nth_write_after_start() -> bool:
        if not counted:
            if not [r for r in all_runs(store) if r.info.run_name == "b"]:
                return False
            counted.append(0)
        if journal.exists():
            counted[0] += 1
            if counted[0] >= writes:
                return True
            while journal.exists():
                time.sleep(0.0001)
        return False

    killed = kill_when(victim, nth_write_after_start, poll=0.0005)
    finish(victim)
    rerun = start_job("entrypoints.baseline", *args, env=child_env(store), cwd=tmp_path)
    out = finish(rerun)
    assert rerun.returncode == 0, out[-3000:]
    assert finish(reference) and reference.returncode == 0
    runs = {r.info.status: r for r in all_runs(store)}
    if killed:
        assert sorted(r.info.status for r in all_runs(store)) == ["FINISHED", "KILLED"], "the killed run is reaped"
    assert not running(store)
    (ref_run,) = all_runs(ref_store)
    compare_to_reference(store, runs["FINISHED"].info.run_id, ref_store, ref_run.info.run_id)


def test_sigterm_stops_moco_cleanly_marks_the_run_killed_and_keeps_a_checkpoint(
    synthetic_data_dir: Path, fresh_store, tmp_path: Path
) -> None:
    store = fresh_store("sigterm")
    args = moco_args(synthetic_data_dir, tmp_path / "ck", "t")
    args[args.index("--checkpoint-minutes") + 1] = "0"  # epoch-end checkpoints only
    args[args.index("--batch-size") + 1] = "16"  # about 56 steps an epoch
    last = tmp_path / "ck" / "t" / "last.pt"
    proc = start_job("entrypoints.moco_pretrain", *args, env=child_env(store), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    # into the second epoch: wait for CPU time the process spent after its first checkpoint (wall
    # time is no measure on a loaded machine, where the process may not run at all for a while)
    cpu_at_checkpoint = cpu_seconds(proc.pid)
    while cpu_seconds(proc.pid) < cpu_at_checkpoint + 0.1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    out = finish(proc, timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    assert [line for line in out.splitlines() if line.startswith("interrupted:")] != [], out[-2000:]
    (run,) = all_runs(store)
    assert run.info.status == "KILLED"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["mlflow_run_id"] == run.info.run_id and not state["finished"]
    mid = state["mid_epoch"]
    assert mid is not None, f"SIGTERM kept only the epoch-end checkpoint of step {state['step']}"
    assert mid["step_in_epoch"] > 0 and 1 <= state["epoch"] < EPOCHS, "the checkpoint is of the interrupted step"
    rerun = start_job("entrypoints.moco_pretrain", *args, env=child_env(store), cwd=tmp_path)
    out = finish(rerun)
    assert rerun.returncode == 0, out[-3000:]
    (resumed,) = all_runs(store)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED", "resumed in place"


def test_a_run_stopped_after_its_final_checkpoint_only_redoes_the_logging(
    synthetic_data_dir: Path, fresh_store, tmp_path: Path
) -> None:
    store = fresh_store("tail")
    args = moco_args(synthetic_data_dir, tmp_path / "ck", "tail")
    first = start_job("entrypoints.moco_pretrain", *args, env=child_env(store), cwd=tmp_path)
    out = finish(first)
    assert first.returncode == 0, out[-3000:]
    (run,) = all_runs(store)
    client = MlflowClient(store)
    # what a kill between the final checkpoint and the end of logging leaves behind
    client.set_terminated(run.info.run_id, status="KILLED")
    final_step = torch.load(tmp_path / "ck" / "tail" / "last.pt", map_location="cpu", weights_only=True)["step"]
    rerun = start_job("entrypoints.moco_pretrain", *args, env=child_env(store), cwd=tmp_path)
    out = finish(rerun)
    assert rerun.returncode == 0, out[-3000:]
    (again,) = all_runs(store)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["resumed_from_step"] == str(final_step), "no step was trained again"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(EPOCHS))
