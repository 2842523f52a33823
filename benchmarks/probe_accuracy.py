"""Test top-1 of the linear, kNN and fine-tuning probes of one encoder over several label
draws, beside the supervised CNN trained on the same draws.

Every number is on the full 10,000-image test set; the 25 validation labels of each draw
only pick the best epoch (never the test set). Features of the labeled and test images are
computed once per draw and shared by the linear and kNN probes; the linear head's training
time on those cached features is reported on its own (the issue asks for under 10 s).

    python benchmarks/probe_accuracy.py --encoder models:/fewshot-moco-encoder@champion
    python benchmarks/probe_accuracy.py --encoder ckpt.pt --draws 0 --epochs 20 --baseline-epochs 5 \\
        --finetune-epochs 5                                             # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.csv_rows import write_rows  # noqa: E402
from fewshot import augment as aug  # noqa: E402
from fewshot.data import draw_labels, labeled_tensors, load_mnist  # noqa: E402
from fewshot.device import PRECISIONS, Precision, configure_threads, pick_device, seed_everything  # noqa: E402
from fewshot.encoder_source import DEFAULT_ENCODER, resolve_encoder  # noqa: E402
from fewshot.evaluate import predict_logits, topk_accuracy  # noqa: E402
from fewshot.linear_head import cached_features  # noqa: E402
from fewshot.models import build_classifier, with_feature_grid  # noqa: E402
from fewshot.probe import ProbeContext, ProbeSettings, default_feature_maps, run_probe  # noqa: E402
from fewshot.train import FitConfig, fit  # noqa: E402

PROBE_LABELS = {"linear": "MoCo + linear probe", "knn": "MoCo + weighted kNN", "finetune": "MoCo + fine-tuning"}


def supervised_cnn(mnist, draw, device: torch.device, epochs: int) -> tuple[float, float]:
    """The foundation baseline's recipe (report CNN, online affine, AdamW one-cycle): test top-1, seconds."""
    started = time.perf_counter()
    generator = seed_everything(draw.seed, device)
    data = labeled_tensors(mnist, draw, device)
    model = build_classifier("cnn").to(device)
    fit(model, (data.x_train, data.y_train), (data.x_val, data.y_val), FitConfig(epochs=epochs, progress=False),
        generator, augment=aug.OnlineAffine())  # fmt: skip
    top1 = topk_accuracy(predict_logits(model, data.x_test), data.y_test)[1]
    return top1, time.perf_counter() - started


def probe_draw(
    encoder, mnist, draw, device: torch.device, args: argparse.Namespace, probes: list[str]
) -> dict[str, float]:
    """``probes`` on one draw, all reading ``encoder``'s features (computed once)."""
    precision = Precision.choose(args.precision, device)
    features = cached_features(encoder, mnist, draw, device, precision=precision)
    images = labeled_tensors(mnist, draw, device)
    row: dict[str, float] = {"draw": draw.seed, "feature_seconds": features.seconds}
    for probe in probes:
        epochs = args.finetune_epochs if probe == "finetune" else args.epochs
        fit_cfg = FitConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                            batch_size=args.batch_size, epochs=epochs, progress=False)  # fmt: skip
        settings = ProbeSettings(fit=fit_cfg, standardize=not args.no_standardize, augment=args.augment,
                                 normalize=not args.no_normalize, refit=not args.no_refit,
                                 knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                                 encoder_lr_ratio=args.encoder_lr_ratio,
                                 tta_views=args.tta_views if probe == "finetune" else 0)  # fmt: skip
        ctx = ProbeContext(encoder=encoder, features=features, images=images, settings=settings,
                           generator=seed_everything(draw.seed, device), device=device, mnist=mnist, draw=draw,
                           precision=precision)  # fmt: skip
        started = time.perf_counter()
        result = run_probe(probe, ctx)
        row[f"{probe}_top1"] = topk_accuracy(result.test_scores, features.y_test)[1]
        if result.plain_test_scores is not None:
            row[f"{probe}_plain_top1"] = topk_accuracy(result.plain_test_scores, features.y_test)[1]
        row[f"{probe}_val_top1"] = topk_accuracy(result.val_scores, features.y_val)[1]
        row[f"{probe}_head_seconds"] = result.head_seconds
        row[f"{probe}_seconds"] = time.perf_counter() - started
    return row


def readouts(encoder, arch: str, args: argparse.Namespace) -> list[tuple[torch.nn.Module, list[str]]]:
    """(read-out module, the probes reading it): ``--feature-maps auto`` gives each probe
    linear_eval's default (two maps for the linear probe on the digit encoder, one for the others)."""
    groups: dict[int, list[str]] = {}
    for probe in args.probes:
        maps = default_feature_maps(probe, arch) if args.feature_maps == "auto" else int(args.feature_maps)
        groups.setdefault(maps, []).append(probe)
    return [(with_feature_grid(encoder, args.feature_grid, maps), probes) for maps, probes in groups.items()]


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def markdown_table(rows: list[dict[str, float]], args: argparse.Namespace, source) -> str:
    draws = [int(r["draw"]) for r in rows]
    header = "| method | test top-1 % (mean ± std) | " + " | ".join(f"draw {d}" for d in draws) + " | s per draw |"
    lines = [header, "|" + "---|" * (3 + len(draws))]
    methods = ([("cnn", "supervised CNN (report's, online affine)")] if "cnn_top1" in rows[0] else []) + [
        (p, PROBE_LABELS[p] + (f" + TTA ({args.tta_views} views)" if p == "finetune" and args.tta_views else ""))
        for p in args.probes
    ]
    if "finetune_plain_top1" in rows[0]:
        methods.append(("finetune_plain", "MoCo + fine-tuning, the same models without TTA"))
    for key, label in methods:
        values = [r[f"{key}_top1"] for r in rows]
        seconds = statistics.mean(r[f"{key.removesuffix('_plain')}_seconds"] for r in rows)
        cells = " | ".join(f"{100 * v:.2f}" for v in values)
        lines.append(f"| {label} | {_mean_std(values)} | {cells} | {seconds:.1f} |")
    head = [r["linear_head_seconds"] for r in rows if "linear_head_seconds" in r]
    notes = [
        "",
        f"Encoder: {source.uri} ({source.arch}, width {source.width}, version {source.version or '-'}, "
        f"run {source.run_id or '-'}); draws {', '.join(map(str, draws))}; 10,000 test images.",
        f"Read-out: feature maps {args.feature_maps} (auto: two for the linear probe, one for the others) pooled "
        f"to {args.feature_grid}x{args.feature_grid}, L2 normalisation "
        f"{'off' if args.no_normalize else 'on'}, refit on all 100 labels {'off' if args.no_refit else 'on'}.",
        f"Features of 100 labeled + 10,000 test images: {statistics.mean(r['feature_seconds'] for r in rows):.1f} s "
        "per draw"
        + (
            f"; linear head on cached features: max {max(head):.2f} s ({args.epochs} epochs, {args.optimizer})."
            if head
            else "."
        ),
    ]
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--probes", nargs="+", choices=list(PROBE_LABELS), default=list(PROBE_LABELS))
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=75)
    parser.add_argument("--epochs", type=int, default=1000, help="linear head epochs")
    parser.add_argument(
        "--feature-grid", type=int, default=2, help="the probes read the last map pooled to grid x grid"
    )
    parser.add_argument("--feature-maps", choices=("auto", "1", "2"), default="auto",
                        help="2: also the map before the last down-sampling (linear_eval --feature-maps)")  # fmt: skip
    parser.add_argument("--no-standardize", action="store_true")
    parser.add_argument("--no-normalize", action="store_true", help="no L2 normalisation before the linear head")
    parser.add_argument(
        "--no-refit", action="store_true", help="keep the early-stopped head or fine-tuned model (75 labels)"
    )
    parser.add_argument(
        "--augment", action="store_true", help="linear probe on features of augmented images (the strong view)"
    )
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.1)
    parser.add_argument("--finetune-epochs", type=int, default=1000)
    parser.add_argument("--encoder-lr-ratio", type=float, default=0.1)
    parser.add_argument("--tta-views", type=int, default=8, help="fine-tuning: test-time augmentation views (0: off)")
    parser.add_argument("--baseline-epochs", type=int, default=1000, help="supervised CNN epochs; 0 skips it")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the encoder's forward passes: auto (bf16 where native), fp32 or bf16",
    )
    parser.add_argument("--out", default="outputs/probe_accuracy")
    args = parser.parse_args()

    configure_threads()
    device = pick_device(args.device)
    mnist = load_mnist(args.data_dir)
    encoder, source = resolve_encoder(args.encoder)
    groups = readouts(encoder, source.arch, args)
    rows = []
    for seed in args.draws:
        draw = draw_labels(mnist.train_labels, seed)
        row: dict[str, float] = {"draw": seed, "feature_seconds": 0.0}
        for read, probes in groups:
            part = probe_draw(read, mnist, draw, device, args, probes)
            row = {**row, **part, "feature_seconds": row["feature_seconds"] + part["feature_seconds"]}
        if args.baseline_epochs > 0:
            row["cnn_top1"], row["cnn_seconds"] = supervised_cnn(mnist, draw, device, args.baseline_epochs)
        rows.append(row)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    table = markdown_table(rows, args, source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    write_rows(out.with_suffix(".csv"), rows)
    print("\n" + table + f"\n(written to {out.with_suffix('.md')} and {out.with_suffix('.csv')}; device {device})")


if __name__ == "__main__":
    main()
