"""Figures people look at before they read numbers (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_figure(matrix: torch.Tensor, title: str) -> Figure:
    """Row-normalised confusion matrix, true digit on rows, predicted on columns."""
    counts = matrix.float()
    normalised = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    n = matrix.shape[0]
    for i in range(n):
        for j in range(n):
            value = normalised[i, j].item()
            if value >= 0.005:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true digit's images")
    fig.tight_layout()
    return fig


def learning_curves_figure(history: list[dict[str, float]], title: str, best_epoch: int | None = None) -> Figure:
    epochs = range(1, len(history) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], label=split)
    for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy")):
        if best_epoch is not None and best_epoch >= 0:
            ax.axvline(best_epoch + 1, color="grey", linestyle="--", linewidth=1, label="best (restored)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid_figure(rows: list[torch.Tensor], row_titles: list[str], title: str) -> Figure:
    """One row of [0, 1] images (N, 1, 28, 28) per entry of ``rows``."""
    n_cols = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(n_cols * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (images, name) in enumerate(zip(rows, row_titles, strict=True)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < images.shape[0]:
                ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(name, fontsize=7, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
