"""MoCo pretraining images/s with the split batch-norm's two paths under bf16, beside fp32, in one run.

- ``fp32``: ``--precision fp32`` (NCHW; the split batch-norm's one-call (N/S, C*S, H, W) view);
- ``bf16-nchw-bn``: ``--precision bf16`` (channels-last) with ``SplitBatchNorm2d.channels_last_path``
  off: the code before the channels-last split batch-norm, which copies every batch-norm input to
  NCHW and hands NCHW on to the ReLU, max-pool and next convolution;
- ``bf16``: ``--precision bf16`` as it runs now (the split batch-norm keeps channels-last).

Each figure is the real loop (``fewshot.pretrain.pretrain``, its defaults: width-32 digit encoder,
batch 256, split-BN 8, K 4096, views made on the fly) timed as ``precision_throughput.py`` does:
images per step over the median step, by wall clock and per CPU second of this process (the figure
that other jobs on the machine disturb least). The three variants alternate, round by round, and
each figure is the median over rounds; ratios compare figures of the same run.

    python benchmarks/split_bn_throughput.py --data-dir ../shared/data --threads 1
    python benchmarks/split_bn_throughput.py --steps 2 --rounds 1   # smoke test
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.precision_throughput import moco_figures, timing_data, timing_parser  # noqa: E402
from fewshot.moco import SplitBatchNorm2d  # noqa: E402

VARIANTS = {"fp32": ("fp32", False), "bf16-nchw-bn": ("bf16", False), "bf16": ("bf16", True)}


def main() -> None:
    args = timing_parser(
        __doc__, 8, 5, "alternations of the three variants", "outputs/split_bn_throughput.json"
    ).parse_args()
    mnist, draw = timing_data(args)
    rounds: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, (precision, channels_last_path) in VARIANTS.items():
            SplitBatchNorm2d.channels_last_path = channels_last_path
            rounds[name].append(moco_figures(precision, args.steps, args.warmup, mnist, draw, "cpu"))
            wall, _, cpu = rounds[name][-1]
            print(f"round {round_ + 1}: {name} {wall:.0f} img/s, {cpu:.0f} per CPU second", flush=True)
    SplitBatchNorm2d.channels_last_path = True
    wall = {name: statistics.median(r[0] for r in runs) for name, runs in rounds.items()}
    cpu = {name: statistics.median(r[2] for r in runs) for name, runs in rounds.items()}
    results = {
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "torch": torch.__version__, "images_per_s": wall, "images_per_cpu_s": cpu,
        "per_round": {name: [[round(v, 1) for v in r] for r in runs] for name, runs in rounds.items()},
    }  # fmt: skip
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| MoCo step | img/s | over fp32 | img per CPU s | over fp32 |\n|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {wall[name]:.0f} | {wall[name] / wall['fp32']:.2f}x | {cpu[name]:.0f} | "
              f"{cpu[name] / cpu['fp32']:.2f}x |")  # fmt: skip
    print(f"\nbf16 now / bf16 before: {wall['bf16'] / wall['bf16-nchw-bn']:.2f}x (per CPU second "
          f"{cpu['bf16'] / cpu['bf16-nchw-bn']:.2f}x); written to {out}")  # fmt: skip


if __name__ == "__main__":
    main()
