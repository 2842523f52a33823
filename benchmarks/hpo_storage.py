"""SQLite vs Optuna's journal file as the study storage: trial throughput with 1 and 4 worker
processes, on a trivial objective (so the numbers are the storage's own cost).

    .venv/bin/python benchmarks/hpo_storage.py --trials 200 --workers 1 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from fewshot.hpo.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore")


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    y = trial.suggest_float("y", 1e-4, 1e-1, log=True)
    trial.report(x, 0)
    return (x - 2) ** 2 + y


def worker(url: str, n_trials: int, seed: int) -> None:
    study = optuna.load_study(
        study_name="bench", storage=open_storage(url), sampler=optuna.samplers.TPESampler(seed=seed)
    )
    study.optimize(objective, n_trials=n_trials)


def measure(url: str, trials: int, workers: int) -> float:
    optuna.create_study(study_name="bench", storage=open_storage(url), direction="minimize")
    started = time.perf_counter()
    procs = [mp.Process(target=worker, args=(url, trials // workers, i)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    elapsed = time.perf_counter() - started
    done = len(optuna.load_study(study_name="bench", storage=open_storage(url)).trials)
    assert done == trials, (done, trials)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print("| storage | workers | trials | seconds | trials/s |\n|---|---|---|---|---|")
    for workers in args.workers:
        for kind in ("sqlite", "journal"):
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{Path(tmp) / 'o.db'}" if kind == "sqlite" else f"journal:///{Path(tmp) / 'o.log'}"
                seconds = measure(url, args.trials, workers)
                print(
                    f"| {kind} | {workers} | {args.trials} | {seconds:.1f} | {args.trials / seconds:.1f} |", flush=True
                )


if __name__ == "__main__":
    main()
