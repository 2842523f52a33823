"""100-label accuracy of MoCo features versus wall-clock minutes of pretraining.

After every epoch of one pretraining run (the CPU defaults unless overridden), the frozen
encoder is probed on the full 10,000-image test set for each label draw:
- kNN: cosine, exp(sim / 0.1)-weighted vote of the 20 nearest of the 100 labeled images;
- linear: logistic regression on L2-normalised, standardised features, C chosen by 5-fold CV
  on the 100 labels (never the test set).
Both read the last feature map average-pooled to a 2x2 grid; the grid and the L2 normalisation
are ``linear_eval``'s defaults (``--feature-grid``, ``--no-normalize``); pretraining itself
uses the global pool.
The clock counts pretraining only (probe time is excluded). The encoder is pretrained once
on draw 0's unlabeled pool; the other draws' labeled images are in that pool, which uses no
labels, so every draw sees the same label-free pretraining.

    python benchmarks/moco_accuracy.py                   # CPU defaults, draws 0 1 2
    python benchmarks/moco_accuracy.py --epochs 1 --max-steps 20 --width 8   # smoke test
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.csv_rows import write_rows  # noqa: E402
from fewshot.data import MNIST, draw_labels, load_mnist, to_unit  # noqa: E402
from fewshot.device import configure_threads  # noqa: E402
from fewshot.evaluate import extract_features, knn_scores  # noqa: E402
from fewshot.models import with_feature_grid  # noqa: E402
from fewshot.pretrain import PretrainConfig, pretrain  # noqa: E402

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
SUPERVISED_CNN_MEAN = 0.943  # the report's CNN with batched affine, draws 0-2 (benchmarks/baselines.py --draws 3)


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0, normalize: bool = False):
    """Logistic regression on standardised (first L2-normalised, with ``normalize``) features, C
    chosen by stratified 5-fold CV on the labeled set. Returns (fitted pipeline, chosen C, its CV
    accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    folds = min(5, int(np.bincount(train_y).min()))
    search = GridSearchCV(
        make_pipeline(*([Normalizer()] if normalize else []), StandardScaler(), LogisticRegression(max_iter=3000)),
        {"logisticregression__C": list(C_GRID)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        n_jobs=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(train_x, train_y)
    return search.best_estimator_, float(search.best_params_["logisticregression__C"]), float(search.best_score_)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    normalize: bool = False,
) -> tuple[float, float, float]:
    """Test accuracy of the CV-tuned linear probe, the chosen C and its 5-fold CV accuracy on the labels."""
    model, c, cv = fit_linear_probe(train_x, train_y, seed, normalize)
    return float((model.predict(test_x) == test_y).mean()), c, cv


def probe_draws(
    encoder: torch.nn.Module,
    mnist: MNIST,
    draws: list,
    test_x: torch.Tensor,
    device: torch.device,
    normalize: bool = False,
) -> dict[str, float]:
    """kNN and linear test accuracy for each draw, and their means."""
    encoder.eval()
    test_f = extract_features(encoder, test_x).float()
    test_y = mnist.test_labels
    out: dict[str, float] = {}
    for draw in draws:
        idx = draw.labeled_idx
        feats = extract_features(encoder, to_unit(mnist.train_images[idx], device)).float()
        labels = mnist.train_labels[idx]
        knn = knn_scores(feats, labels.to(device), test_f, k=20, temperature=0.1).argmax(1).cpu()
        out[f"knn_draw{draw.seed}"] = float((knn == test_y).float().mean())
        acc, c, cv = linear_probe(
            feats.cpu().numpy(), labels.numpy(), test_f.cpu().numpy(), test_y.numpy(), draw.seed, normalize
        )
        out[f"linear_draw{draw.seed}"] = acc
        out[f"C_draw{draw.seed}"] = c
        out[f"cv_draw{draw.seed}"] = cv
    for kind in ("knn", "linear", "cv"):
        values = [out[f"{kind}_draw{d.seed}"] for d in draws]
        out[f"{kind}_mean"] = float(np.mean(values))
        out[f"{kind}_std"] = float(np.std(values))
    return out


def main() -> None:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--moco-k", type=int, default=defaults.moco_k)
    parser.add_argument("--moco-t", type=float, default=defaults.moco_t)
    parser.add_argument("--moco-m", type=float, default=defaults.moco_m)
    parser.add_argument("--augment", default=defaults.augment)
    parser.add_argument("--augment-strength", type=float, default=defaults.augment_strength)
    parser.add_argument("--positive", default=defaults.positive, help="key, or nearest (NNCLR's positives)")
    parser.add_argument("--nearest-k", type=int, default=defaults.nearest_k, help="with --positive nearest: positives")
    parser.add_argument("--symmetric", action="store_true", help="both views as queries (twice the cost a step)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (draw 0's unlabeled pool)")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--feature-grid", type=int, default=2, help="probes read the last map pooled to grid x grid")
    parser.add_argument("--no-normalize", action="store_true", help="no L2 normalisation before the linear probe")
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke tests)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/moco_accuracy.csv")
    parser.add_argument(
        "--checkpoint-dir", default=None,
        help="keep each epoch's checkpoint as <dir>/epoch<N>.pt (for probe_accuracy.py --encoder)",
    )  # fmt: skip
    args = parser.parse_args()

    configure_threads()
    cfg = PretrainConfig(
        arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        moco_k=args.moco_k, moco_t=args.moco_t, moco_m=args.moco_m, augment=args.augment,
        augment_strength=args.augment_strength, seed=args.seed,
        positive=args.positive, nearest_k=args.nearest_k, symmetric=args.symmetric, data_dir=args.data_dir,
        device=args.device, knn_test=False, max_steps_per_epoch=args.max_steps, checkpoint_minutes=0,
    )  # fmt: skip
    cfg.validate()
    mnist = load_mnist(args.data_dir)
    draws = [draw_labels(mnist.train_labels, seed) for seed in args.draws]
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else args.device
        if args.device != "auto"
        else "cpu"
    )
    test_x = to_unit(mnist.test_images, device)
    rows: list[dict[str, float]] = []
    started = time.perf_counter()
    probe_seconds = 0.0

    def evaluate(epoch: int, backbone: torch.nn.Module) -> dict[str, float]:
        gridded = with_feature_grid(backbone, args.feature_grid)
        return probe_draws(gridded, mnist, draws, test_x, device, normalize=not args.no_normalize)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal probe_seconds
        probe_seconds += metrics["evaluate_s"]
        minutes = (time.perf_counter() - started - probe_seconds) / 60
        row = {"epoch": epoch + 1, "pretrain_minutes": minutes, **metrics}
        rows.append(row)
        print(
            f"epoch {row['epoch']:3d}  {minutes:6.2f} min  {row['images_per_s']:7.0f} img/s  loss {row['loss']:.3f}  "
            f"kNN {row['knn_mean']:.4f}  linear {row['linear_mean']:.4f} "
            "("
            + " / ".join(f"{row['linear_draw' + str(d.seed)]:.4f}" for d in draws)
            + f")  CV on labels {row['cv_mean']:.4f}",
            flush=True,
        )

    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None

    def keep_epoch(path: Path) -> None:  # the pretraining rewrites last.pt every epoch; keep a copy of each
        shutil.copyfile(path, path.with_name(f"epoch{len(rows)}.pt"))

    pretrain(
        cfg, mnist, draws[0], on_epoch=on_epoch, evaluate=evaluate,
        checkpoint_path=checkpoint_dir / "last.pt" if checkpoint_dir else None,
        on_checkpoint=keep_epoch if checkpoint_dir else None,
    )  # fmt: skip
    out = Path(args.out)
    write_rows(out, rows)
    final = rows[-1]
    verdict = "meets" if final["linear_mean"] >= 0.955 and final["linear_mean"] > SUPERVISED_CNN_MEAN else "misses"
    print(
        f"final: linear {final['linear_mean']:.4f} +- {final['linear_std']:.4f}, kNN {final['knn_mean']:.4f} after "
        f"{final['pretrain_minutes']:.1f} min of pretraining; {verdict} the target (>= 0.955 and > supervised CNN "
        f"{SUPERVISED_CNN_MEAN}); table in {out}"
    )


if __name__ == "__main__":
    main()
