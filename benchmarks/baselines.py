"""Supervised baselines over several label draws: markdown table of test top-1.

    python benchmarks/baselines.py --data-dir ../shared/data --draws 5

Each run is a real tracked `baseline` run (experiment `fewshot-benchmarks` in the
default store unless MLFLOW_TRACKING_URI says otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.baseline import BaselineConfig, run_baseline  # noqa: E402
from fewshot.train import FitConfig  # noqa: E402


def summarise(name: str, accuracies: list[float], seconds: list[float]) -> str:
    mean = statistics.mean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    per_draw = " / ".join(f"{100 * a:.1f}" for a in accuracies)
    return (
        f"| {name} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * min(accuracies):.2f} | {per_draw} "
        f"| {statistics.mean(seconds):.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--draws", type=int, default=5, help="label draws: seeds 0..draws-1")
    parser.add_argument("--models", nargs="+", default=["mlp1", "mlp2", "cnn"])
    parser.add_argument("--epochs", type=int, default=FitConfig.epochs)
    parser.add_argument("--augment", default="online")
    parser.add_argument("--experiment", default="fewshot-benchmarks")
    parser.add_argument("--tta-views", type=int, default=BaselineConfig.tta_views, help="0: no test-time augmentation")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        accuracies, plain, seconds = [], [], []
        for seed in range(args.draws):
            cfg = BaselineConfig(
                model=model, augment=args.augment, seed=seed, data_dir=args.data_dir, experiment=args.experiment,
                run_name=f"bench-{model}-seed{seed}", tta_views=args.tta_views,
                fit=FitConfig(epochs=args.epochs, progress=False),
            )  # fmt: skip
            result = run_baseline(cfg)
            accuracies.append(result["test_top1"])
            plain.append(result["test_plain_top1"])
            seconds.append(result["wall_seconds"])
            print(f"{model} seed {seed}: test top-1 {result['test_top1']:.4f}, without TTA "
                  f"{result['test_plain_top1']:.4f} ({result['wall_seconds']:.0f} s)", flush=True)  # fmt: skip
        if args.tta_views:
            rows.append(summarise(f"{model} + TTA ({args.tta_views} views)", accuracies, seconds))
        rows.append(summarise(model, plain, seconds))
    print(f"\n| model | test top-1 % (mean ± std, {args.draws} draws) | min | per draw | wall time per run |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
