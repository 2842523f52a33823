"""A 2-D picture of the feature space: PCA or t-SNE of test features, coloured by digit."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from fewshot import plots  # noqa: F401  (selects the Agg backend before pyplot is imported)
from fewshot.errors import UserError

METHODS = ("pca", "tsne", "none")


def project_2d(features: torch.Tensor, method: str, seed: int = 0) -> np.ndarray:
    """(N, D) features -> (N, 2) coordinates."""
    x = features.detach().float().cpu()
    if method == "pca":
        centred = x - x.mean(dim=0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return (centred @ v[:2].T).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x.numpy())
    raise UserError(f"--embedding {method}: choose one of {', '.join(METHODS)}")


def subsample(n: int, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` indices out of ``n``, drawn with a fixed seed (t-SNE is quadratic)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def embedding_figure(
    features: torch.Tensor, labels: torch.Tensor, method: str, title: str, seed: int = 0, limit: int = 3000
) -> Figure:
    import matplotlib.pyplot as plt

    if method == "tsne":
        keep = subsample(features.shape[0], limit, seed)
        features, labels = features[keep.to(features.device)], labels[keep.to(labels.device)]
    coords = project_2d(features, method, seed)
    y = labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for digit in range(10):
        mask = y == digit
        ax.scatter(coords[mask, 0], coords[mask, 1], s=3, alpha=0.6, color=cmap(digit), label=str(digit))
    ax.legend(title="digit", markerscale=4, loc="best", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({method.upper()}, {coords.shape[0]} test images)")
    fig.tight_layout()
    return fig
