"""Convolution speed on 28x28 digits: the default NCHW layout with 1000-image inference batches
(the code before `fewshot.device.place`) against channels-last weights with 256-image batches
(`fewshot.evaluate.EVAL_BATCH`), measured in one run on one machine.

- inference: the 10,000 test images through the width-32 digit encoder (2x2 feature grid, as the
  probes read it) and through the report's CNN, in eval mode;
- training: optimizer steps of the report's CNN (batch 100, as the baselines) and of the digit
  encoder with a linear head (batch 75, as fine-tuning), forward and backward.
Also the largest difference between the two layouts' outputs (same weights, same images).

    python benchmarks/memory_layout.py --data-dir ../shared/data
    python benchmarks/memory_layout.py --images 500 --steps 3 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.data import load_mnist, to_unit  # noqa: E402
from fewshot.device import configure_threads, place  # noqa: E402
from fewshot.evaluate import EVAL_BATCH, predict_logits  # noqa: E402
from fewshot.models import DigitEncoder, EncoderClassifier, ReportCNN, with_feature_grid  # noqa: E402

OLD_BATCH = 1000


def best_of(repeats: int, work: Callable[[], None]) -> float:
    """The fastest of ``repeats`` timings (seconds): the least disturbed by the rest of the machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def work() -> None:
        model.train()
        for step in range(steps):
            start = (step * batch) % (x.shape[0] - batch)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[start : start + batch]), y[start : start + batch]).backward()
            optimizer.step()

    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="test images for the inference timings")
    parser.add_argument("--steps", type=int, default=100, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    configure_threads()
    torch.manual_seed(0)
    mnist = load_mnist(args.data_dir)
    x = to_unit(mnist.test_images[: args.images], "cpu")
    y = mnist.test_labels[: args.images]
    models = {"digit encoder (2x2 grid)": with_feature_grid(DigitEncoder(32), 2), "report CNN": ReportCNN()}
    print(f"{torch.get_num_threads()} threads, {args.images} images, best of {args.repeats}")
    print("| work | NCHW, batch 1000 (s) | channels-last, batch 256 (s) | speed-up | max output difference |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        model.eval()
        fast = place(copy.deepcopy(model), "cpu").eval()
        old = best_of(args.repeats, lambda m=model: predict_logits(m, x, OLD_BATCH))
        new = best_of(args.repeats, lambda m=fast: predict_logits(m, x, EVAL_BATCH))
        gap = (predict_logits(model, x, OLD_BATCH) - predict_logits(fast, x, EVAL_BATCH)).abs().max().item()
        print(f"| inference, {name} | {old:.2f} | {new:.2f} | {old / new:.2f}x | {gap:.1e} |", flush=True)
    classifier = EncoderClassifier(with_feature_grid(DigitEncoder(32), 2))
    for name, model, batch in (("report CNN", ReportCNN(), 100), ("digit encoder + head", classifier, 75)):
        fast = place(copy.deepcopy(model), "cpu")
        old = best_of(args.repeats, train_steps(model, x, y, args.steps, batch))
        new = best_of(args.repeats, train_steps(fast, x, y, args.steps, batch))
        print(f"| training, {name}, {args.steps} steps of {batch} | {old:.2f} | {new:.2f} | {old / new:.2f}x | |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
