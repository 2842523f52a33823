"""How good a MoCo encoder's features are while it trains: weighted kNN over the labeled draw.

``knn_accuracy`` is the per-epoch monitor (bank: the 75 train labels); ``selection_score``, a
leave-one-out kNN over all 100 labeled images, is what the registry and the search compare.
Neither ever reads the test set unless the caller passes it as the query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data import LabeledTensors
from fewshot.device import Precision, precision_context
from fewshot.evaluate import eval_mode, extract_features, knn_scores


@torch.no_grad()
def knn_accuracy(
    encoder: nn.Module, bank_x, bank_y, query_x, query_y, k: int, t: float, precision: Precision | None = None
) -> float:
    """Weighted cosine kNN top-1; the features under ``precision``, the votes in fp32."""
    with eval_mode(encoder), precision_context(precision):
        bank = extract_features(encoder, bank_x).float()
        query = extract_features(encoder, query_x).float()
    scores = knn_scores(bank, bank_y, query, k=k, temperature=t)
    return float((scores.argmax(1) == query_y).float().mean())


@torch.no_grad()
def loo_knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20, t: float = 0.1) -> float:
    """Leave-one-out weighted cosine kNN over a small labeled set (each image voted on by the others)."""
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    k = min(k, f.shape[0] - 1)
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(f.shape[0], int(labels.max()) + 1, device=f.device)
    votes.scatter_add_(1, labels[idx], (top / t).exp())
    return float((votes.argmax(1) == labels).float().mean())


def selection_score(encoder: nn.Module, labeled: LabeledTensors, k: int = 20, t: float = 0.1) -> float:
    """The registry score: leave-one-out kNN over the 100 labeled images (never the test set)."""
    x = torch.cat([labeled.x_train, labeled.x_val])
    y = torch.cat([labeled.y_train, labeled.y_val])
    return loo_knn_accuracy(extract_features(encoder, x), y, k, t)
