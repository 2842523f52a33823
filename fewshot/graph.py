"""Label propagation over a k-nearest-neighbour graph of embeddings.

The unlabeled pool's neighbourhoods, as an embedding (the MoCo encoder's) sees them, carry the
100 labels to every image: a kNN graph with weights ``max(cos, 0) ** gamma``, symmetrised and
normalised as ``D^-1/2 W D^-1/2``, and the diffusion ``Z <- alpha S Z + (1 - alpha) Y`` from the
one-hot seeds ``Y`` (Zhou et al., 2004; the weights as in Iscen et al., 2019). Each image gets a
class distribution and a certainty ``1 - H(z) / log C``: the graph's pseudo-labels and how much
to trust them. Pure functions on tensors; no labels beyond the seeds are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KnnGraph:
    indices: torch.Tensor  # (N, k) each node's neighbours, itself excluded, most similar first
    similarities: torch.Tensor  # (N, k) their cosine similarities

    @property
    def k(self) -> int:
        return self.indices.shape[1]


@dataclass(frozen=True)
class Propagated:
    probs: torch.Tensor  # (N, C) class distribution of every node (rows sum to 1)
    predictions: torch.Tensor  # (N,) argmax
    certainty: torch.Tensor  # (N,) 1 - normalised entropy, in [0, 1]


@torch.no_grad()
def knn_graph(features: torch.Tensor, k: int, chunk: int = 4096) -> KnnGraph:
    """The ``k`` most cosine-similar other rows of ``features`` (N, D), in chunks of rows so the
    N x N similarity matrix is never held whole."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and {n - 1} (the number of other nodes); got {k}")
    unit = F.normalize(features.float(), dim=1)
    indices, similarities = [], []
    for start in range(0, n, chunk):
        block = unit[start : start + chunk] @ unit.T
        rows = torch.arange(block.shape[0], device=block.device)
        block[rows, rows + start] = -math.inf  # a node is not its own neighbour
        values, positions = block.topk(k, dim=1)
        indices.append(positions)
        similarities.append(values)
    return KnnGraph(torch.cat(indices), torch.cat(similarities))


def edge_weights(graph: KnnGraph, gamma: float = 3.0) -> torch.Tensor:
    """(N, k) ``max(s_ij, 0) ** gamma``: the power sharpens towards the closest neighbours."""
    return graph.similarities.clamp(min=0).pow(gamma)


def propagation_matrix(graph: KnnGraph, gamma: float = 3.0) -> torch.Tensor:
    """``D^-1/2 (A + A^T) D^-1/2`` as a sparse (N, N) tensor, ``A_ij`` the ``edge_weights`` of
    i's neighbours j."""
    n, k = graph.indices.shape
    rows = torch.arange(n, device=graph.indices.device).repeat_interleave(k)
    weights = edge_weights(graph, gamma).reshape(-1)
    edges = torch.stack([rows, graph.indices.reshape(-1)])
    adjacency = torch.sparse_coo_tensor(edges, weights, (n, n))
    adjacency = (adjacency + adjacency.t()).coalesce()
    degree = torch.sparse.sum(adjacency, dim=1).to_dense().clamp(min=1e-12)
    scale = degree.rsqrt()
    i, j = adjacency.indices()
    return torch.sparse_coo_tensor(adjacency.indices(), adjacency.values() * scale[i] * scale[j], (n, n)).coalesce()


@torch.no_grad()
def propagate(
    matrix: torch.Tensor,
    seed_positions: torch.Tensor,
    seed_labels: torch.Tensor,
    n_classes: int,
    alpha: float = 0.99,
    iterations: int = 20,
) -> Propagated:
    """Diffuse the seeds' one-hot labels over ``matrix`` (``propagation_matrix``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    n = matrix.shape[0]
    seeds = torch.zeros(n, n_classes, device=matrix.device)
    seeds[seed_positions, seed_labels] = 1.0
    z = seeds.clone()
    for _ in range(iterations):
        z = alpha * torch.sparse.mm(matrix, z) + (1 - alpha) * seeds
    z = z.clamp(min=0)
    mass = z.sum(dim=1, keepdim=True)
    # a node the diffusion never reached has no evidence: uniform, certainty 0
    probs = torch.where(mass > 0, z / mass.clamp(min=1e-12), torch.full_like(z, 1.0 / n_classes))
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
    certainty = (1 - entropy / math.log(n_classes)).clamp(0, 1)
    return Propagated(probs, probs.argmax(dim=1), certainty)
