"""Figures of a semi-supervised run: learning curves, and the weak and strong views of a few images."""

from __future__ import annotations

import torch

from fewshot import augment as aug
from fewshot import plots
from fewshot.data import to_unit
from fewshot.semisup.config import Metrics, SemisupConfig
from fewshot.semisup.data import SemisupData


def curves_figure(history: list[Metrics], title: str):
    import matplotlib.pyplot as plt  # after fewshot.plots has selected the Agg backend

    steps = [h["step"] for h in history]
    fig, (ax_acc, ax_pl, ax_loss) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("val_acc", "validation top-1 (25)"), ("test_acc", "test top-1 (monitor)")):
        if all(key in h for h in history):
            ax_acc.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax_acc.set_ylabel("accuracy")
    for key, label in (("mask_rate", "mask rate"), ("pseudo_acc", "pseudo-label accuracy (masked)"),
                       ("pseudo_acc_all", "weak-view accuracy (all)")):  # fmt: skip
        if all(key in h for h in history):
            ax_pl.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax_pl.set_ylabel("share")
    ax_loss.plot(steps, [h["sup_loss"] for h in history], label="labeled CE")
    ax_loss.plot(steps, [h["unsup_loss"] for h in history], label="unlabeled CE (masked)")
    ax_loss.set_ylabel("loss")
    for ax in (ax_acc, ax_pl, ax_loss):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def views_figure(data: SemisupData, cfg: SemisupConfig):
    x = to_unit(data.pool[:8].cpu())
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = [x] + [aug.random_affine(x, cfg.weak_spec(), generator) for _ in range(2)]
    rows += [aug.random_view(x, cfg.strong_spec(), generator) for _ in range(3)]
    names = ["original", "weak #1", "weak #2", "strong #1", "strong #2", "strong #3"]
    return plots.image_grid_figure(rows, names, f"weak and strong views (strong={cfg.strong})")
