"""Pseudo-labels smoothed over the starting encoder's neighbourhoods of the training images.

CoMatch's memory-smoothed pseudo-labels (Li et al., 2021) on a fixed graph: before training, the
encoder the run starts from (the MoCo encoder) embeds the unlabeled pool and the labeled images,
and ``fewshot.graph`` links each pool image to its ``k`` most similar training images. A memory
holds one class distribution per node: the labeled images' one-hot labels (fixed) and, for the
pool, first the labels propagated over the graph from the labeled ones, then each image's latest
target. A weak view's prediction ``p`` becomes ``alpha * p + (1 - alpha) * sum_j w_j m_j`` over
its neighbours' memories ``m_j`` (weights ``max(cos, 0) ** 3``, rows normalised), and that target
goes back into the memory. A prediction its neighbourhood disagrees with loses confidence and may
fall below the threshold; one it agrees with gains. Only images and the labeled draw's labels
are read; never the pool's labels, never the test set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data import NUM_CLASSES, to_unit
from fewshot.device import Precision
from fewshot.evaluate import extract_features
from fewshot.graph import edge_weights, knn_graph, propagate, propagation_matrix
from fewshot.models import with_feature_grid

# the probes' read-out (last map pooled to 2x2), on which label propagation was measured
# (docs/benchmarks.md, label propagation over the MoCo embedding)
FEATURE_GRID = 2
WEIGHT_POWER = 3.0  # fewshot.graph's gamma: sharpens the weights towards the closest neighbours
EMBED_BATCH = 2048


@torch.no_grad()
def embed_images(encoder: nn.Module, pool: torch.Tensor, labeled: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Features of the pool (uint8) then the labeled images ([0, 1]), one row each, fp32 (as
    ``extract_features`` returns them under autocast)."""
    gridded = with_feature_grid(encoder, FEATURE_GRID).eval()
    rows = []
    with precision.autocast():
        for start in range(0, pool.shape[0], EMBED_BATCH):  # uint8 -> float a batch at a time
            rows.append(extract_features(gridded, to_unit(pool[start : start + EMBED_BATCH])))
        rows.append(extract_features(gridded, labeled))
    return torch.cat(rows)


class NeighbourSmoother:
    """The graph (each pool image's neighbours and weights) and the memory of class distributions."""

    def __init__(self, neighbours: torch.Tensor, weights: torch.Tensor, memory: torch.Tensor, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1]; got {alpha}")
        self.neighbours, self.weights, self.memory, self.alpha = neighbours, weights, memory, alpha

    @classmethod
    def from_features(
        cls, features: torch.Tensor, n_pool: int, labels: torch.Tensor, k: int, alpha: float
    ) -> NeighbourSmoother:
        """``features``: the pool's rows first, then one per labeled image (whose ``labels`` seed the memory)."""
        if features.shape[0] != n_pool + labels.shape[0]:
            raise ValueError(f"expected {n_pool} pool rows and {labels.shape[0]} labeled rows; got {features.shape[0]}")
        graph = knn_graph(features, k)
        seeds = torch.arange(n_pool, features.shape[0], device=features.device)
        spread = propagate(propagation_matrix(graph, WEIGHT_POWER), seeds, labels, NUM_CLASSES)
        memory = spread.probs.clone()
        memory[seeds] = F.one_hot(labels, NUM_CLASSES).float()
        weights = edge_weights(graph, WEIGHT_POWER)[:n_pool]
        # an image with no positively similar neighbour keeps its own prediction (its weights sum to 0)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return cls(graph.indices[:n_pool].clone(), weights, memory, alpha)

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor, pool_positions: torch.Tensor) -> torch.Tensor:
        """Smoothed targets for the pool images at ``pool_positions``; they replace those images' memories."""
        weights = self.weights[pool_positions].unsqueeze(-1)  # (B, k, 1)
        neighbourhood = (weights * self.memory[self.neighbours[pool_positions]]).sum(dim=1)
        has_neighbours = weights.sum(dim=1) > 0
        mixed = self.alpha * probs + (1 - self.alpha) * neighbourhood
        smoothed = torch.where(has_neighbours, mixed, probs)
        self.memory[pool_positions] = smoothed
        return smoothed

    def state_dict(self) -> dict[str, Any]:
        # the memory changes every step: a copy, so a state taken now stays as it was (as PseudoLabeler's)
        return {"neighbours": self.neighbours.cpu(), "weights": self.weights.cpu(), "memory": self.memory.cpu().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any], alpha: float, device: torch.device) -> NeighbourSmoother:
        return cls(state["neighbours"].to(device), state["weights"].to(device), state["memory"].to(device), alpha)


def build_smoother(
    encoder: nn.Module, pool: torch.Tensor, x_labeled: torch.Tensor, y_labeled: torch.Tensor, k: int, alpha: float,
    precision: Precision,
) -> NeighbourSmoother:  # fmt: skip
    """The smoother of a run: ``encoder`` (the one training starts from) embeds the pool and labeled images."""
    features = embed_images(encoder, pool, x_labeled, precision)
    return NeighbourSmoother.from_features(features, pool.shape[0], y_labeled.to(features.device), k, alpha)
