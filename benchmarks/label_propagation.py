"""Label propagation over the MoCo embedding of the 60,000 training images, as a classifier.

Issue 14's first direction ("the MoCo embedding as a graph over the 60,000 training images") measured
on its own: a frozen encoder embeds every training image (the probes' read-out: last map pooled to
2x2, L2-normalised), ``fewshot.graph`` builds one cosine kNN graph over them (no labels) and diffuses
each draw's 100 labels over it. A test image takes the weighted kNN vote of its 20 nearest training
images' propagated labels (inductive: test images are never in the graph). The graph's k is chosen
per draw by stratified 5-fold CV over the 100 labels (propagate from four fifths, score the held-out
fifth); the test set only reports. Beside it, the plain weighted kNN from the 100 labels alone. The
pool's accuracy (propagated labels against the pool's true labels) is printed for people to read;
nothing chooses by it.

    python benchmarks/label_propagation.py --encoder <moco checkpoint> --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.csv_rows import write_rows  # noqa: E402
from fewshot.data import NUM_CLASSES, draw_labels, load_mnist, to_unit  # noqa: E402
from fewshot.device import configure_threads  # noqa: E402
from fewshot.encoder_source import load_checkpoint  # noqa: E402
from fewshot.evaluate import extract_features, knn_scores  # noqa: E402
from fewshot.graph import KnnGraph, knn_graph, propagate, propagation_matrix  # noqa: E402
from fewshot.models import with_feature_grid  # noqa: E402

K_GRID = (10, 20, 50)


def graphs_by_k(features: torch.Tensor, ks: tuple[int, ...], gamma: float) -> dict[int, torch.Tensor]:
    """One kNN search at the largest k; each smaller k keeps its rows' first neighbours."""
    widest = knn_graph(features, max(ks))
    return {
        k: propagation_matrix(KnnGraph(widest.indices[:, :k], widest.similarities[:, :k]), gamma) for k in ks
    }  # fmt: skip


def cv_accuracy(matrix: torch.Tensor, seeds: torch.Tensor, labels: torch.Tensor, alpha: float, draw: int) -> float:
    """Stratified 5-fold CV over the labeled images: propagate from four fifths, score the rest."""
    folds = StratifiedKFold(5, shuffle=True, random_state=draw)
    hits = 0
    for fit_rows, held_rows in folds.split(seeds.numpy(), labels.numpy()):
        spread = propagate(matrix, seeds[fit_rows], labels[fit_rows], NUM_CLASSES, alpha)
        hits += int((spread.predictions[seeds[held_rows]] == labels[held_rows]).sum())
    return hits / seeds.shape[0]


def run_draw(mnist, draw, matrices: dict[int, torch.Tensor], train_f, test_f, alpha: float) -> dict[str, float]:
    seeds = draw.labeled_idx
    labels = mnist.train_labels[seeds]
    cv = {k: cv_accuracy(m, seeds, labels, alpha, draw.seed) for k, m in matrices.items()}
    best_k = max(cv, key=lambda k: (cv[k], -k))  # ties: the sparser graph
    spread = propagate(matrices[best_k], seeds, labels, NUM_CLASSES, alpha)
    pool = draw.unlabeled_idx
    test_y = mnist.test_labels
    graph_votes = knn_scores(train_f, spread.predictions, test_f).argmax(1)
    plain_votes = knn_scores(train_f[seeds], labels, test_f).argmax(1)
    return {
        "draw": draw.seed,
        "k": best_k,
        **{f"cv_k{k}": v for k, v in cv.items()},
        "pool_acc": float((spread.predictions[pool] == mnist.train_labels[pool]).float().mean()),
        "test_top1": float((graph_votes == test_y).float().mean()),
        "knn_100_top1": float((plain_votes == test_y).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="a moco_pretrain checkpoint (last.pt)")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ks", type=int, nargs="+", default=list(K_GRID), help="graph k, chosen by CV per draw")
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--gamma", type=float, default=3.0)
    parser.add_argument("--feature-grid", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="outputs/label_propagation.csv")
    args = parser.parse_args()

    configure_threads()
    started = time.perf_counter()
    mnist = load_mnist(args.data_dir)
    encoder, source = load_checkpoint(Path(args.encoder))
    encoder = with_feature_grid(encoder, args.feature_grid).eval()
    train_f = extract_features(encoder, to_unit(mnist.train_images))
    test_f = extract_features(encoder, to_unit(mnist.test_images))
    matrices = graphs_by_k(train_f, tuple(sorted(set(args.ks))), args.gamma)
    print(f"features and graphs: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for seed in args.draws:
        row = run_draw(mnist, draw_labels(mnist.train_labels, seed), matrices, train_f, test_f, args.alpha)
        rows.append(row)
        print(
            f"draw {seed}: k {row['k']} (CV " + " / ".join(f"{row[f'cv_k{k}']:.2f}" for k in matrices) + ")  "
            f"pool {row['pool_acc']:.4f}  test {row['test_top1']:.4f}  (kNN from the 100 labels {row['knn_100_top1']:.4f})",
            flush=True,
        )
    out = Path(args.out)
    write_rows(out, rows)
    for key, name in (("test_top1", "label propagation"), ("knn_100_top1", "kNN from the 100 labels")):
        values = [r[key] for r in rows]
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        print(f"{name}: {100 * statistics.mean(values):.2f} +- {100 * spread:.2f}% test top-1 over draws {args.draws}")
    print(f"encoder {source.uri}; {time.perf_counter() - started:.0f} s in all; rows in {out}")


if __name__ == "__main__":
    main()
