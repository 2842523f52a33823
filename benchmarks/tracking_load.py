"""N processes logging metrics and artifacts to one MLflow tracking server at once (PostgreSQL
backend, artifacts proxied to S3): the metrics per second the stack sustains, and every point
accounted for afterwards (none lost, none duplicated).

Each process opens a run and logs ``--steps`` steps of ``--keys`` metrics, one ``log_batch``
per step (what the training loops' tracker does per epoch), plus a 64 KB artifact every
``--artifact-every`` steps. Without ``--tracking-uri`` the benchmark starts its own stack on
127.0.0.1 (the scale-out tests' PostgreSQL, moto S3 and ``mlflow server``).

    .venv/bin/python benchmarks/tracking_load.py --processes 4 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

ARTIFACT_BYTES = 64 * 1024
# offline, MLflow's telemetry client gives up and unsets an environment variable that a concurrent
# request reads: one log_batch of 8 processes failed with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def log_one_run(uri: str, experiment: str, worker: int, steps: int, keys: int, every: int, start) -> None:
    """One client process: a run, ``steps`` batches of ``keys`` metrics, an artifact now and then."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=f"load-{worker}", tags={"worker": str(worker)})
    payload = os.urandom(ARTIFACT_BYTES)
    with tempfile.TemporaryDirectory() as tmp:
        start.wait()  # every process starts logging at the same moment, imports and run creation done
        for step in range(steps):
            now = int(time.time() * 1000)
            metrics = [Metric(f"m{k}", worker * 1e6 + step * 10 + k, now, step) for k in range(keys)]
            client.log_batch(run.info.run_id, metrics=metrics, synchronous=True)
            if every and step % every == 0:
                path = Path(tmp) / f"blob-{step:05d}.bin"
                path.write_bytes(payload)
                client.log_artifact(run.info.run_id, str(path), "blobs")
        client.set_terminated(run.info.run_id)


def check_runs(uri: str, experiment: str, steps: int, keys: int, every: int) -> tuple[int, int, int, int]:
    """(points found, lost, duplicated, artifacts found) over every run of ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = lost = duplicated = artifacts = 0
    for run in client.search_runs([experiment_id], max_results=1000):
        worker = int(run.data.tags["worker"])
        for k in range(keys):
            history = client.get_metric_history(run.info.run_id, f"m{k}")
            by_step: dict[int, list[float]] = {}
            for point in history:
                by_step.setdefault(point.step, []).append(point.value)
            found += len(history)
            lost += sum(1 for s in range(steps) if worker * 1e6 + s * 10 + k not in by_step.get(s, []))
            duplicated += sum(len(values) - 1 for values in by_step.values())
        artifacts += len(client.list_artifacts(run.info.run_id, "blobs"))
    return found, lost, duplicated, artifacts


def measure(uri: str, processes: int, steps: int, keys: int, every: int) -> str:
    from mlflow.tracking import MlflowClient

    experiment = f"load-{processes}p-{int(time.time())}"
    MlflowClient(uri).create_experiment(experiment)
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(processes + 1)
    procs = [ctx.Process(target=log_one_run, args=(uri, experiment, w, steps, keys, every, start))
             for w in range(processes)]  # fmt: skip
    for proc in procs:
        proc.start()
    start.wait(timeout=600)
    started = time.perf_counter()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - started
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    found, lost, duplicated, artifacts = check_runs(uri, experiment, steps, keys, every)
    expected_artifacts = processes * len(range(0, steps, every)) if every else 0
    points = processes * steps * keys
    return (f"N={processes}: {points} points ({processes * steps} log_batch calls) and {expected_artifacts} "
            f"artifacts of {ARTIFACT_BYTES // 1024} KB in {elapsed:.1f} s -> {points / elapsed:.0f} metrics/s, "
            f"{processes * steps / elapsed:.1f} batches/s; found {found} points, lost {lost}, duplicated "
            f"{duplicated}; artifacts found {artifacts}/{expected_artifacts}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--artifact-every", type=int, default=20)
    parser.add_argument("--tracking-uri", default="", help="A running server (default: start a stack here).")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers of the stack.")
    args = parser.parse_args()
    stack = None
    uri = args.tracking_uri
    if not uri:
        from tests.scaleout.stack import start_stack

        stack = start_stack(Path(tempfile.mkdtemp(prefix="tracking-load-")), workers=args.server_workers)
        uri = stack.tracking_uri
        print(f"stack: {uri} (PostgreSQL backend, artifacts to s3 via the server, --workers {args.server_workers})")
    try:
        for processes in args.processes:
            print(measure(uri, processes, args.steps, args.keys, args.artifact_every), flush=True)
    finally:
        if stack is not None:
            stack.close()


if __name__ == "__main__":
    main()
