"""Images/second before (fp32, the path before precision was a choice) and after (``--precision
auto``, bf16 on a CPU with AMX / AVX-512 BF16) for MoCo pretraining and the semi-supervised step,
beside the usual library-style MoCo loop on the same encoder, measured in one run on one machine.

- MoCo: the real loop (``fewshot.pretrain.pretrain``) with its defaults (width-32 digit encoder,
  batch 256, split-BN 8, K 4096, views made on the fly), 256 images per step.
- semi-supervised: the real loop (``fewshot.semisup.train_semisup``) with its defaults (32 labeled
  + 7 x 32 unlabeled images per step, each unlabeled image seen weakly and strongly) on the same
  encoder at random init; figures are unlabeled images per second (224 per step), as the loop's
  own ``unlabeled_per_s``.
- library-style: MoCo v2's standard per-image transform as the popular self-supervised libraries
  ship it, applied with torchvision to PIL images through a 2-worker DataLoader, feeding the same
  MoCo model in fp32 (their CPU default): RandomResizedCrop(28, scale 0.2-1), horizontal flip,
  ColorJitter(0.4, 0.4) with p 0.8 (brightness and contrast only: saturation and hue are no-ops on
  one channel), GaussianBlur (3x3, sigma 0.1-2) with p 0.5; RandomGrayscale is left out (a no-op
  on one channel).
Every loop runs ``--warmup`` + ``--steps`` optimizer steps; a step's time is the interval between
two optimizer steps (views, forward, backward, update: everything the loop does), and a figure is
images per step over the median step time of the timed steps (robust to the other processes of a
shared machine; the mean is printed beside). fp32 and auto alternate ``--rounds`` times and the
best round counts; ratios compare figures of the same run.

    python benchmarks/precision_throughput.py --data-dir ../shared/data
    python benchmarks/precision_throughput.py --steps 2 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moco_throughput import PILTwoViews, time_loader_steps  # noqa: E402
from fewshot.data import MNIST, LabeledDraw, draw_labels, load_mnist  # noqa: E402
from fewshot.device import configure_threads, cpu_has_native_bf16, resolve_precision  # noqa: E402
from fewshot.moco import MoCo  # noqa: E402
from fewshot.models import build_encoder  # noqa: E402
from fewshot.pretrain import PretrainConfig, pretrain  # noqa: E402
from fewshot.semisup import SemisupConfig, prepare_model, semisup_data, train_semisup  # noqa: E402


def moco_v2_views(size: int = 28) -> T.Compose:
    """MoCo v2's per-image augmentation on 1-channel PIL digits (see the module docstring)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
    ])  # fmt: skip


class StepClock:
    """Wall-clock and process CPU-time stamps of every optimizer step taken while it is active."""

    def __enter__(self) -> StepClock:
        self.stamps: list[tuple[float, float]] = []
        self._hook = register_optimizer_step_post_hook(
            lambda *_: self.stamps.append((time.perf_counter(), time.process_time()))
        )
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()

    def figures(self, images_per_step: int, warmup: int) -> tuple[float, float, float]:
        """Of the steps after ``warmup``: images/s over the median step, over the mean step, and over
        the median step's CPU time of this process (all its threads; DataLoader workers not counted)."""
        timed = list(zip(self.stamps[warmup - 1 :], self.stamps[warmup:], strict=False))
        wall = [b[0] - a[0] for a, b in timed]
        cpu = [b[1] - a[1] for a, b in timed]
        return (images_per_step / statistics.median(wall), images_per_step / statistics.mean(wall),
                images_per_step / statistics.median(cpu))  # fmt: skip


def moco_figures(precision: str, steps: int, warmup: int, mnist: MNIST, draw: LabeledDraw, device: str):
    cfg = PretrainConfig(epochs=1, max_steps_per_epoch=warmup + steps, warmup_epochs=0, knn_test=False,
                         progress=False, checkpoint_minutes=0, device=device, precision=precision)  # fmt: skip
    with StepClock() as clock:
        pretrain(cfg, mnist, draw)
    return clock.figures(cfg.batch_size, warmup)


def semisup_figures(precision: str, steps: int, warmup: int, mnist: MNIST, draw: LabeledDraw, device: str):
    cfg = SemisupConfig(init="random", steps=warmup + steps, eval_every=warmup + steps, eval_test=False, tta_views=0,
                        progress=False, device=device, precision=precision)  # fmt: skip
    data = semisup_data(mnist, draw, torch.device(device), with_test=False)
    model = prepare_model(cfg, data, None)
    with StepClock() as clock:
        train_semisup(cfg, data, model)
    return clock.figures(cfg.unlabeled_batch, warmup)


def library_figures(steps: int, warmup: int, workers: int, mnist: MNIST, draw: LabeledDraw, device: str):
    defaults = PretrainConfig()
    torch.manual_seed(0)
    model = MoCo(build_encoder(defaults.arch, defaults.width), k=defaults.moco_k, temperature=defaults.moco_t,
                 bn_splits=defaults.bn_splits).to(device)  # fmt: skip
    pool = mnist.train_images[draw.unlabeled_idx]
    loader = DataLoader(PILTwoViews(pool, moco_v2_views()), batch_size=defaults.batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with StepClock() as clock:
        time_loader_steps(model, loader, steps, warmup, torch.device(device))
    return clock.figures(defaults.batch_size, warmup)


def timing_parser(doc: str | None, steps: int, rounds: int, rounds_help: str, out: str) -> argparse.ArgumentParser:
    """The options every throughput benchmark here shares (this one and ``split_bn_throughput.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (kernels, allocator)")
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: as the loops, every core)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=out)
    return parser


def timing_data(args: argparse.Namespace) -> tuple[MNIST, LabeledDraw]:
    """Threads as asked, then MNIST and draw 0 (whose pool the timed loops read)."""
    configure_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    mnist = load_mnist(args.data_dir)
    return mnist, draw_labels(mnist.train_labels, 0)


def main() -> None:
    parser = timing_parser(__doc__, 24, 3, "fp32 / auto alternations (best round kept)",
                           "outputs/precision_throughput.json")  # fmt: skip
    parser.add_argument("--library-steps", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the library-style loop")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    mnist, draw = timing_data(args)
    resolved = resolve_precision("auto", args.device)
    started = time.perf_counter()
    results: dict[str, object] = {
        "device": args.device, "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
        "auto_resolves_to": resolved, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "torch": torch.__version__,
    }  # fmt: skip
    print(f"device {args.device}, {torch.get_num_threads()} threads, auto -> {resolved}", flush=True)
    best: dict[str, tuple[float, float, float]] = {}
    for round_ in range(args.rounds):
        for name, measure in (("moco", moco_figures), ("semisup", semisup_figures)):
            for precision in ("fp32", "auto"):
                figures = measure(precision, args.steps, args.warmup, mnist, draw, args.device)
                key = f"{name}_{precision}"
                best[key] = max(best.get(key, (0.0, 0.0, 0.0)), figures)
                print(f"round {round_ + 1}: {key} {figures[0]:.0f} img/s (mean step {figures[1]:.0f}; per CPU "
                      f"second {figures[2]:.0f})", flush=True)  # fmt: skip
    best["library_fp32"] = library_figures(args.library_steps, args.warmup, args.workers, mnist, draw, args.device)
    print(f"library-style MoCo v2 loop ({args.workers} workers): {best['library_fp32'][0]:.0f} img/s "
          f"(mean step {best['library_fp32'][1]:.0f})", flush=True)  # fmt: skip

    fig = {key: value[0] for key, value in best.items()}
    results.update({f"{key}_images_per_s": value for key, value in fig.items()})
    results.update({f"{key}_images_per_s_mean_step": value[1] for key, value in best.items()})
    results.update({f"{key}_images_per_cpu_s": value[2] for key, value in best.items() if key != "library_fp32"})
    results["moco_auto_over_fp32_cpu"] = best["moco_auto"][2] / best["moco_fp32"][2]
    results["semisup_auto_over_fp32_cpu"] = best["semisup_auto"][2] / best["semisup_fp32"][2]
    results["moco_auto_over_fp32"] = fig["moco_auto"] / fig["moco_fp32"]
    results["semisup_auto_over_fp32"] = fig["semisup_auto"] / fig["semisup_fp32"]
    results["moco_auto_over_library"] = fig["moco_auto"] / fig["library_fp32"]
    results["moco_fp32_over_library"] = fig["moco_fp32"] / fig["library_fp32"]
    results["seconds"] = time.perf_counter() - started
    print(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        f"\n| loop | fp32 (before) | auto ({resolved}) | ratio |\n|---|---:|---:|---:|\n"
        f"| MoCo pretraining, img/s | {fig['moco_fp32']:.0f} | {fig['moco_auto']:.0f} | "
        f"{results['moco_auto_over_fp32']:.2f}x |\n"
        f"| semi-supervised step, unlabeled img/s | {fig['semisup_fp32']:.0f} | {fig['semisup_auto']:.0f} | "
        f"{results['semisup_auto_over_fp32']:.2f}x |\n"
        f"| library-style MoCo v2 loop (PIL, {args.workers} workers, fp32), img/s | {fig['library_fp32']:.0f} | | |\n"
        f"\nMoCo auto / library-style = {results['moco_auto_over_library']:.2f}x (fp32: "
        f"{results['moco_fp32_over_library']:.2f}x). Per CPU second of this process: MoCo "
        f"{results['moco_auto_over_fp32_cpu']:.2f}x, semi-supervised {results['semisup_auto_over_fp32_cpu']:.2f}x. "
        f"{results['seconds']:.0f} s; written to {out}"
    )


if __name__ == "__main__":
    main()
