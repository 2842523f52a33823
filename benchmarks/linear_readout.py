"""What else the frozen MoCo encoder's cached-feature linear probe could read (issue 14's 97%).

Every variant keeps `linear_eval`'s head recipe (L2 normalisation, standardisation fitted on the
labeled features, AdamW one-cycle, 1000 full-batch epochs, all 100 labels) and changes only the
features it is trained on:
- ``default``: the last map pooled to 2x2 (`linear_eval`'s read-out);
- ``two-maps``: the same plus the last 14x14 map pooled to 2x2, concatenated;
- ``pool-standardised``: the standardisation's mean and std from unlabeled pool images instead
  of the 100 labeled ones;
- ``pool-centred``: the pool's mean feature subtracted before the L2 normalisation (SimpleShot's
  CL2N), then the pool standardisation;
- ``pool-whitened``: the pool-centred, L2-normalised features whitened by the pool's covariance
  (eigenvalues shrunk by 0.1 of their mean);
- ``<view>-views``: each labeled image plus ``--views`` augmented copies (``strong``: the
  probes' strong digit view with crossbars; ``affine``: the mild affine; ``moco``: MoCo's own
  two-view augmentation), features computed once.
The pool transforms read pool images only (never a pool label). The figure a variant could be
chosen by is stratified 5-fold cross-validation over each draw's 100 labels, the folds of `hpo`'s
objective (`fewshot.hpo.folds.make_splits`; views of an image stay in its fold, only plain images are
scored), averaged over ``--fold-repeats`` fold draws; test top-1 on the full 10,000 images is printed
beside it for the record.

    python benchmarks/linear_readout.py --encoder models:/fewshot-moco-encoder@champion
    python benchmarks/linear_readout.py --encoder ckpt.pt --draws 0 --epochs 20 --views 2   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.csv_rows import write_rows  # noqa: E402
from fewshot import augment as aug  # noqa: E402
from fewshot.data import MNIST, draw_labels, load_mnist, to_unit  # noqa: E402
from fewshot.device import Precision, configure_threads, precision_context, seed_everything  # noqa: E402
from fewshot.encoder_source import DEFAULT_ENCODER, resolve_encoder  # noqa: E402
from fewshot.evaluate import topk_accuracy  # noqa: E402
from fewshot.hpo.folds import LabeledSet, Split, make_splits  # noqa: E402
from fewshot.linear_head import FeatureSet, train_linear_head  # noqa: E402
from fewshot.pretrain.config import VIEW_PRESETS  # noqa: E402
from fewshot.train import FitConfig  # noqa: E402

POOL_IMAGES = 10_000  # as --bn-recalibration: enough for stable means and covariances
FOLDS = 5
VIEWS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "strong": aug.OnlineView(replace(aug.STRONG_DIGITS, bar_probability=0.3)),
    "affine": aug.OnlineAffine(aug.AffineSpec()),
    "moco": aug.OnlineView(VIEW_PRESETS["digits"]),
}
VARIANTS = ("default", "two-maps", "pool-standardised", "pool-centred", "pool-whitened") + tuple(
    f"{view}-views" for view in VIEWS
)
Transform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def pooled_maps(encoder: nn.Module, images: torch.Tensor, precision: Precision) -> dict[str, torch.Tensor]:
    """The DigitEncoder's last 7x7 and last 14x14 maps of [0, 1] ``images``, each average-pooled to 2x2
    and flattened (fp32)."""
    last, mid = [], []
    with precision_context(precision):
        for start in range(0, images.shape[0], 1000):
            x, seen = images[start : start + 1000], {}
            for module in encoder.body:
                if isinstance(module, nn.AdaptiveAvgPool2d):
                    break
                x = module(x)
                if isinstance(module, nn.ReLU):
                    seen[x.shape[-1]] = x
            last.append(nn.functional.adaptive_avg_pool2d(seen[7].float(), 2).flatten(1))
            mid.append(nn.functional.adaptive_avg_pool2d(seen[14].float(), 2).flatten(1))
    return {"last": torch.cat(last), "mid": torch.cat(mid)}


def pool_transform(variant: str, pool: torch.Tensor) -> Transform:
    """Features -> features for the pool variants, fitted on the pool's features only."""
    unit = nn.functional.normalize
    centre = pool.mean(0) if variant != "pool-standardised" else torch.zeros_like(pool[0])
    normed = unit(pool - centre, dim=1)
    mean = normed.mean(0)
    if variant == "pool-whitened":
        values, vectors = torch.linalg.eigh(torch.cov((normed - mean).T))
        whiten = vectors / (values + 0.1 * values.mean()).sqrt()
        return lambda x: (unit(x - centre, dim=1) - mean) @ whiten
    std = normed.std(0).clamp(min=1e-6)
    return lambda x: (unit(x - centre, dim=1) - mean) / std


def head_accuracy(x: torch.Tensor, y: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor, own_scaling: bool,
                  epochs: int, seed: int) -> float:  # fmt: skip
    """Top-1 on (x_eval, y_eval) of `linear_eval`'s head trained on (x, y); ``own_scaling``: the
    head's L2 normalisation and standardisation (off where a pool transform replaces them)."""
    cfg = FitConfig(epochs=epochs, batch_size=x.shape[0], progress=False)
    features = FeatureSet(x, y, x[:0], y[:0], x_eval, y_eval)
    head, _ = train_linear_head(features, cfg, own_scaling, seed_everything(seed, x.device), normalize=own_scaling)
    with torch.no_grad():
        return topk_accuracy(head(x_eval), y_eval, ks=(1,))[1]


def cross_validated(x: torch.Tensor, y: torch.Tensor, splits: list[Split], own_scaling: bool, epochs: int,
                    seed: int) -> float:  # fmt: skip
    """Accuracy over the plain labeled images, each scored by a head that never saw it (nor its views):
    rows ``i + j * n`` of ``x`` are view ``j`` of labeled image ``i`` (view 0 the plain image)."""
    n = sum(len(split.val) for split in splits)
    repeats = x.shape[0] // n
    correct = 0.0
    for split in splits:
        fit_rows = torch.cat([split.train + j * n for j in range(repeats)])
        accuracy = head_accuracy(x[fit_rows], y[fit_rows], x[split.val], y[split.val], own_scaling, epochs, seed)
        correct += accuracy * len(split.val)
    return correct / n


def draw_rows(
    encoder: nn.Module, mnist: MNIST, seed: int, args: argparse.Namespace, test: dict, precision: Precision
) -> list[dict]:
    """One row per variant for one label draw: its CV accuracy on the labels and its test top-1."""
    draw = draw_labels(mnist.train_labels, seed)
    labeled = torch.cat([draw.train_idx, draw.val_idx])
    images, y = to_unit(mnist.train_images[labeled]), mnist.train_labels[labeled]
    labeled_set = LabeledSet(images, y, len(draw.train_idx))
    # the hpo objective's folds; repeat r draws them again with seed + 1000 r (r = 0: hpo's own)
    fold_draws = [make_splits(labeled_set, FOLDS, seed + 1000 * r) for r in range(args.fold_repeats)]
    maps = pooled_maps(encoder, images, precision)
    pool = pooled_maps(encoder, to_unit(mnist.train_images[draw.unlabeled_idx[:POOL_IMAGES]]), precision)["last"]
    rows = []
    for variant in args.variants:
        x, x_test, own_scaling, repeats = maps["last"], test["last"], True, 1
        if variant == "two-maps":
            x, x_test = torch.cat([x, maps["mid"]], 1), torch.cat([x_test, test["mid"]], 1)
        elif variant.startswith("pool-"):
            transform, own_scaling = pool_transform(variant, pool), False
            x, x_test = transform(x), transform(x_test)
        elif variant.endswith("-views"):
            view, generator = VIEWS[variant.removesuffix("-views")], torch.Generator().manual_seed(seed)
            warped = [view(images, generator) for _ in range(args.views)]
            x = torch.cat([x] + [pooled_maps(encoder, w, precision)["last"] for w in warped])
            repeats = args.views + 1
        ys = y.repeat(repeats)
        rows.append({
            "draw": seed, "variant": variant, "feature_dim": x.shape[1],
            "cv_top1": sum(cross_validated(x, ys, splits, own_scaling, args.epochs, seed) for splits in fold_draws)
            / len(fold_draws),
            "test_top1": head_accuracy(x, ys, x_test, mnist.test_labels, own_scaling, args.epochs, seed),
        })  # fmt: skip
        print(f"draw {seed} {variant:18s} cv {100 * rows[-1]['cv_top1']:.1f}  test {100 * rows[-1]['test_top1']:.2f}",
              flush=True)  # fmt: skip
    return rows


def markdown_table(rows: list[dict], variants: list[str]) -> str:
    draws = sorted({r["draw"] for r in rows})
    lines = ["| read-out | CV on the labels % | test top-1 % (mean ± std) | " + " | ".join(f"draw {d}" for d in draws)
             + " |", "|" + "---|" * (3 + len(draws))]  # fmt: skip
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        test = [100 * r["test_top1"] for r in mine]
        spread = statistics.stdev(test) if len(test) > 1 else 0.0
        cv = statistics.mean(100 * r["cv_top1"] for r in mine)
        cells = " | ".join(f"{t:.2f}" for t in test)
        lines.append(f"| {variant} | {cv:.1f} | {statistics.mean(test):.2f} ± {spread:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--views", type=int, default=16, help="augmented copies of each labeled image")
    parser.add_argument("--epochs", type=int, default=1000, help="linear head epochs (linear_eval's default)")
    parser.add_argument("--fold-repeats", type=int, default=1,
                        help="average the 5-fold CV over this many fold draws (less fold noise)")  # fmt: skip
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/linear_readout.csv"))
    args = parser.parse_args()
    configure_threads()
    precision = Precision.choose("auto", torch.device("cpu"))
    mnist = load_mnist(args.data_dir)
    encoder, source = resolve_encoder(args.encoder)
    if not hasattr(encoder, "body"):
        raise SystemExit(f"{args.encoder}: the read-outs are written for the digit encoder, not {source.arch}")
    encoder.eval()
    test = pooled_maps(encoder, to_unit(mnist.test_images), precision)
    rows = [row for seed in args.draws for row in draw_rows(encoder, mnist, seed, args, test, precision)]
    write_rows(args.out, rows)
    print(markdown_table(rows, args.variants) + f"\nEncoder: {source.uri}; rows in {args.out}")


if __name__ == "__main__":
    main()
