"""Greedy one-factor-at-a-time search of MoCo settings at a fixed image budget (GPU helper).

Every config is pretrained once (seed 0) and probed with the 100 labels of draws 0, 1, 2.
Selection uses a validation split of the *training* set (10,000 images outside every draw,
labels used only to score): the linear probe trained on each draw's 100 labels, mean over
draws. The test-set accuracy is printed for the record and never used to choose.

    python benchmarks/moco_sweep.py --budget-s 420 --epochs 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moco_accuracy import fit_linear_probe  # noqa: E402
from fewshot.data import draw_labels, load_mnist, to_unit  # noqa: E402
from fewshot.evaluate import extract_features, knn_scores  # noqa: E402
from fewshot.pretrain import VIEW_PRESETS, PretrainConfig, pretrain  # noqa: E402

BASE_VIEW = VIEW_PRESETS["digits"]
VIEW_PRESETS["no_elastic"] = dataclasses.replace(BASE_VIEW, elastic_alpha=0.0)
VIEW_PRESETS["wide_crop"] = dataclasses.replace(BASE_VIEW, crop_scale=(0.3, 1.2))
VIEW_PRESETS["mild_crop"] = dataclasses.replace(BASE_VIEW, crop_scale=(0.7, 1.3))
VIEW_PRESETS["no_blur"] = dataclasses.replace(BASE_VIEW, blur_probability=0.0)
VIEW_PRESETS["erase"] = dataclasses.replace(BASE_VIEW, erase_probability=0.5, erase_fraction=0.4)
VIEW_PRESETS["big_affine"] = dataclasses.replace(BASE_VIEW, rotation=25.0, shear=20.0)
VIEW_PRESETS["strong_elastic"] = dataclasses.replace(BASE_VIEW, elastic_alpha=60.0)
VIEW_PRESETS["elastic20"] = dataclasses.replace(BASE_VIEW, elastic_alpha=20.0)
VIEW_PRESETS["stroke"] = dataclasses.replace(BASE_VIEW, stroke_probability=0.5)
VIEW_PRESETS["stroke_elastic20"] = dataclasses.replace(BASE_VIEW, stroke_probability=0.5, elastic_alpha=20.0)


def evaluate(encoder, mnist, draws, dev_x, dev_y, test_x, device) -> dict[str, float]:
    encoder.eval()
    dev_f = extract_features(encoder, dev_x).float()
    test_f = extract_features(encoder, test_x).float()
    out: dict[str, list[float]] = {"dev_linear": [], "test_linear": [], "test_knn": [], "cv": []}
    for draw in draws:
        idx = draw.labeled_idx
        feats = extract_features(encoder, to_unit(mnist.train_images[idx], device)).float()
        labels = mnist.train_labels[idx]
        knn = knn_scores(feats, labels.to(device), test_f, k=20, temperature=0.1).argmax(1).cpu()
        out["test_knn"].append(float((knn == mnist.test_labels).float().mean()))
        both = torch.cat([dev_f, test_f]).cpu().numpy()
        both_y = np.concatenate([dev_y.numpy(), mnist.test_labels.numpy()])
        clf, _, cv = fit_linear_probe(feats.cpu().numpy(), labels.numpy(), draw.seed)
        out["cv"].append(cv)
        pred = clf.predict(both)
        n_dev = dev_f.shape[0]
        out["dev_linear"].append(float((pred[:n_dev] == both_y[:n_dev]).mean()))
        out["test_linear"].append(float((pred[n_dev:] == both_y[n_dev:]).mean()))
    return {k: float(np.mean(v)) for k, v in out.items() if v} | {
        "test_linear_draws": " / ".join(f"{v:.4f}" for v in out["test_linear"])
    }


ROUND2 = [
    ("T0.3", {"moco_t": 0.3}),
    ("stroke", {"augment": "stroke"}),
    ("T0.5", {"moco_t": 0.5}),
    ("elastic20", {"augment": "elastic20"}),
    ("batch128", {"batch_size": 128}),
    ("m0.95", {"moco_m": 0.95}),
    ("seed1", {"seed": 1}),
    ("w24", {"width": 24}),
    ("w16", {"width": 16}),
    ("stroke_elastic20", {"augment": "stroke_elastic20"}),
    ("wd1e-4", {"weight_decay": 1e-4}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="outputs/moco_sweep.jsonl")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--round", type=int, default=2, help="1: the first sweep (base T 0.1); 2: around its best")
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (smoke test)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mnist = load_mnist(args.data_dir)
    draws = [draw_labels(mnist.train_labels, s) for s in (0, 1, 2)]
    used = torch.cat([d.labeled_idx for d in draws])
    mask = torch.ones(60000, dtype=torch.bool)
    mask[used] = False
    dev_idx = torch.nonzero(mask).squeeze(1)[
        torch.randperm(int(mask.sum()), generator=torch.Generator().manual_seed(123))[:10000]
    ]
    dev_x = to_unit(mnist.train_images[dev_idx], device)
    dev_y = mnist.train_labels[dev_idx]
    test_x = to_unit(mnist.test_images, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    e = args.epochs
    base = PretrainConfig(
        epochs=e,
        progress=False,
        knn_test=False,
        checkpoint_minutes=0,
        device=str(device),
        max_steps_per_epoch=args.max_steps,
    )

    def run(name: str, cfg: PretrainConfig) -> dict:
        t0 = time.perf_counter()
        result = pretrain(cfg, mnist, draws[0])
        train_s = time.perf_counter() - t0
        scores = evaluate(result.encoder.to(device), mnist, draws, dev_x, dev_y, test_x, device)
        row = {"name": name, "train_s": round(train_s, 1), "ips": round(result.history[-1]["images_per_s"]),
               "loss": round(result.history[-1]["loss"], 3), "knn_val": result.history[-1]["knn_val_acc"], **scores,
               "config": {k: v for k, v in dataclasses.asdict(cfg).items() if getattr(base, k) != v or k == "epochs"}}  # fmt: skip
        print(f"{name:28s} dev {row['dev_linear']:.4f}  test lin {row['test_linear']:.4f} ({row['test_linear_draws']})  "
              f"knn {row['test_knn']:.4f}  loss {row['loss']:.3f}  {row['ips']} img/s  {train_s:.0f}s", flush=True)  # fmt: skip
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    if args.round == 1:
        base = dataclasses.replace(base, moco_t=0.1)
    best_cfg = base
    best = run("base", base)
    if args.round == 1:
        run(
            "naive(T0.2,K8192,const m)",
            dataclasses.replace(base, augment="naive", moco_t=0.2, moco_k=8192, m_schedule="constant"),
        )
    variants = (
        ROUND2
        if args.round == 2
        else [
            ("T0.2", {"moco_t": 0.2}),
            ("T0.05", {"moco_t": 0.05}),
            ("strength1.5", {"augment_strength": 1.5}),
            ("no_elastic", {"augment": "no_elastic"}),
            ("lr0.15", {"lr": 0.15}),
            ("big_affine", {"augment": "big_affine"}),
            ("strong_elastic", {"augment": "strong_elastic"}),
            ("mild_crop", {"augment": "mild_crop"}),
            ("wide_crop", {"augment": "wide_crop"}),
            ("K16384", {"moco_k": 16384}),
            ("K1024", {"moco_k": 1024}),
            ("symmetric_half_epochs", {"symmetric": True, "epochs": max(1, e // 2)}),
            ("w16_x1.5_epochs", {"width": 16, "epochs": int(e * 1.5)}),
            ("bn_splits1(leak)", {"bn_splits": 1}),
            ("no_mlp", {"mlp": False}),
            ("lr0.03", {"lr": 0.03}),
            ("erase", {"augment": "erase"}),
            ("m0.999const", {"moco_m": 0.999, "m_schedule": "constant"}),
            ("no_blur", {"augment": "no_blur"}),
            ("w48_half_epochs", {"width": 48, "epochs": max(1, e // 2)}),
        ]
    )
    for name, change in variants:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget reached; skipped from {name} on", flush=True)
            break
        cfg = dataclasses.replace(best_cfg, **change)
        try:
            row = run(name + ("" if best_cfg is base else " (on best)"), cfg)
        except Exception as exc:  # keep sweeping
            print(f"{name}: failed {type(exc).__name__}: {exc}", flush=True)
            continue
        if name not in ("seed1", "w24", "w16") and row["dev_linear"] > best["dev_linear"] + 0.003:
            best, best_cfg = row, cfg
            print(f"  -> new best: {name}", flush=True)
    print("BEST", json.dumps(best), flush=True)
    if args.round == 1 and time.perf_counter() - started < args.budget_s + 60:
        run("best_x2_epochs", dataclasses.replace(best_cfg, epochs=best_cfg.epochs * 2))


if __name__ == "__main__":
    main()
