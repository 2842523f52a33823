"""Fault injection, the long version of tests/reliability: N random SIGKILLs of moco_pretrain.

One uninterrupted reference run, then one faulted run killed N times (SIGKILL) at random
moments and rerun with the same command (``--resume auto``) after each kill. A kill point is
drawn per attempt: during a checkpoint write (the temp file exists), during an MLflow write
(SQLite's rollback journal exists), or a random time into a step. After the last rerun the
faulted run must hold every epoch exactly once, the reference's metrics and weights bit for
bit, a readable checkpoint, and no run RUNNING. Then, optionally, the worker and bad-input
figures come from the reliability suite (``--with-suite``).

    python -m benchmarks.faults --kills 20                      # synthetic digits, ~15 min on 2 cores
    python -m benchmarks.faults --kills 20 --data-dir ../shared/data --epochs 1   # real MNIST: ~2 h on 2 cores
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from mlflow.tracking import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TIMING = {"images_per_s", "elapsed_s", "augment_share", "evaluate_s", "wall_seconds"}
KINDS = ("checkpoint write", "mlflow write", "random time")


def env_for(store: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def launch(args: list[str], store: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "entrypoints.moco_pretrain", *args], cwd=cwd, env=env_for(store),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def histories(store: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(store)
    keys = [k for k in client.get_run(run_id).data.metrics if k not in TIMING]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def runs(store: str) -> list:
    client = MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def attempt(args, store, cwd, last: Path, journal: Path, kind: str, rng: random.Random) -> dict:
    """Start one attempt and SIGKILL it at a point of ``kind``; returns what happened."""
    proc = launch(args, store, cwd)
    before = mtime(last)
    checkpoints, fired, delay, k = [before], [], rng.uniform(0.0, 0.3), rng.randint(1, 6)
    started = time.monotonic()
    while proc.poll() is None:
        now = mtime(last)
        if now != checkpoints[-1]:
            checkpoints.append(now)
        hit = False
        if kind == "checkpoint write":
            hit = len(checkpoints) > k - 1 and (last.parent / f".last.pt.{proc.pid}.tmp").exists()
        elif kind == "mlflow write":
            hit = len(checkpoints) > k - 1 and journal.exists()
        else:
            if not fired and len(checkpoints) > k:
                fired.append(time.monotonic())
            hit = bool(fired) and time.monotonic() - fired[0] >= delay
        if hit:
            hot = journal.exists()
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"kind": kind, "killed": True, "after_s": round(time.monotonic() - started, 2),
                    "checkpoints_seen": len(checkpoints) - 1, "journal_left": hot and journal.exists()}  # fmt: skip
        time.sleep(0.0002)
    out, _ = proc.communicate()
    return {"kind": kind, "killed": False, "returncode": proc.returncode, "tail": out[-300:]}


@click.command()
@click.option("--kills", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--data-dir", default="", help="MNIST IDX folder (default: synthetic digits written to a temp dir).")
@click.option("--epochs", type=int, default=4, show_default=True)
@click.option("--width", type=int, default=4, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the kill points (default: random, printed).")
@click.option("--with-suite/--no-suite", default=False, help="Also run tests/reliability and report its figures.")
@click.option("--json-out", default="", help="Write the figures as JSON here.")
def main(kills, data_dir, epochs, width, batch_size, seed, with_suite, json_out) -> None:
    seed = random.SystemRandom().randrange(10**6) if seed is None else seed
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="fewshot-faults-"))
    if not data_dir:
        sys.path.insert(0, str(PROJECT_ROOT))
        from tests.synthetic import write_mnist_folder

        data_dir = str(write_mnist_folder(work / "data", n_train=100 + batch_size * 8, n_test=200))
    common = ["--data-dir", str(Path(data_dir).resolve()), "--width", str(width), "--epochs", str(epochs),
              "--batch-size", str(batch_size), "--moco-k", str(batch_size * 2), "--bn-splits", "4",
              "--checkpoint-minutes", "0.00001", "--no-progress"]  # fmt: skip
    ref_store, store = f"sqlite:///{work / 'ref.db'}", f"sqlite:///{work / 'faulted.db'}"
    journal = work / "faulted.db-journal"
    for uri in (ref_store, store):  # migrate both stores before timing anything
        MlflowClient(uri).search_experiments()
    t0 = time.monotonic()
    reference = launch([*common, "--checkpoint-dir", str(work / "ck-ref"), "--run-name", "ref"], ref_store, work)
    ref_out, _ = reference.communicate()
    if reference.returncode != 0:
        raise SystemExit(f"reference run failed:\n{ref_out[-3000:]}")
    ref_seconds = time.monotonic() - t0
    args = [*common, "--checkpoint-dir", str(work / "ck"), "--run-name", "faulted"]
    last = work / "ck" / "faulted" / "last.pt"
    (ref_run,) = runs(ref_store)
    want = histories(ref_store, ref_run.info.run_id)
    ref_state = torch.load(work / "ck-ref" / "ref" / "last.pt", map_location="cpu", weights_only=True)

    results, identical = [], 0
    for i in range(kills):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)
        killed = attempt(args, store, work, last, journal, kind, rng)
        final = launch(args, store, work)
        out, _ = final.communicate()
        faulted = sorted((r for r in runs(store) if r.info.run_name == "faulted"), key=lambda r: r.info.start_time)
        run = faulted[-1]
        ok = final.returncode == 0 and run.info.status == "FINISHED"
        same = ok and histories(store, run.info.run_id) == want
        state = torch.load(last, map_location="cpu", weights_only=True) if last.exists() else {}
        same = (
            same
            and state.get("finished")
            and all(torch.equal(state["encoder_state"][k], v) for k, v in ref_state["encoder_state"].items())
        )
        stuck = [r.info.run_id for r in runs(store) if r.info.status == "RUNNING"]
        same = bool(same) and not stuck
        identical += same
        killed.update(identical=same, rerun_returncode=final.returncode, running_left=len(stuck),
                      runs_for_name=len(faulted))  # fmt: skip
        if not same:
            killed["rerun_tail"] = out[-1500:]
        results.append(killed)
        print(f"kill {i + 1}/{kills}: {json.dumps(killed)}", flush=True)
        # the next kill starts a fresh run: the finished checkpoint is not resumed (resume=auto)
    landed = sum(r["killed"] for r in results)
    figures = {
        "kills_tried": kills,
        "kills_landed": landed,
        "resumed_identical": identical,
        "seed": seed,
        "by_kind": {k: sum(r["killed"] for r in results if r["kind"] == k) for k in KINDS},
        "hot_journal_left": sum(bool(r.get("journal_left")) for r in results),
        "reference_seconds": round(ref_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    print(f"\n{identical}/{kills} resumed with identical final metrics "
          f"({landed} kills landed before the run finished; seed {seed})")  # fmt: skip
    if with_suite:
        figures["suite"] = run_suite()
    print(json.dumps(figures, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps({"figures": figures, "kills": results}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    if identical != kills:
        raise SystemExit(1)


def run_suite() -> dict:
    """Worker and bad-input figures: run tests/reliability and count its cases."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/reliability", "-p", "no:cacheprovider"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)  # fmt: skip
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    bad = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/reliability/test_bad_input.py"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True).stdout  # fmt: skip
    cases = len(re.findall(r"test_bad_input\.py::", bad))
    return {"summary": tail, "bad_input_cases": cases, "returncode": done.returncode}


if __name__ == "__main__":
    main()
