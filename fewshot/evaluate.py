"""Scoring a model: inference in eval mode, test-time augmentation, top-k accuracy, confusion
matrices, feature extraction and the weighted kNN vote."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.augment import TTA_SPEC, random_affine
from fewshot.data import NUM_CLASSES
from fewshot.device import Precision, precision_context


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> dict[int, float]:
    """Share of rows whose target is among the k highest scores, for each k.

    Classes are ranked by score, ties broken towards the lower class index (as ``argmax``
    does, so top-1 always agrees with the confusion matrix); the target's rank is the number
    of classes ahead of it. k larger than the number of classes counts every row as correct.
    """
    target_scores = logits.gather(1, targets.view(-1, 1).long())  # (N, 1)
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1)
    ahead = (logits > target_scores) | ((logits == target_scores) & (classes < targets.view(-1, 1)))
    rank = ahead.sum(dim=1)  # 0 for the top class
    rank[target_scores.view(-1).isnan()] = torch.iinfo(rank.dtype).max  # a NaN score is never a hit, at any k
    return {k: float((rank < k).float().mean()) for k in ks}


# inference batches: on CPU, 128-256 images of 28x28 run the convolutions about 1.8x faster than 1000
EVAL_BATCH = 256


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, back in the mode it had (train or eval) after it:
    scoring in the middle of training must not leave batch-norm or dropout switched."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Outputs of ``model`` in eval mode, batch by batch. Under a caller's bf16 autocast the forward
    runs in bf16 and the outputs come back fp32 (softmax, kNN votes and top-k read them)."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def predict_tta(
    model: nn.Module, x: torch.Tensor, views: int, generator: torch.Generator, plain: torch.Tensor | None = None
) -> torch.Tensor:
    """Test-time augmentation: the log of the mean softmax over ``x`` and ``views`` mildly warped
    copies of it (the default affine at half strength), usable wherever logits are. ``plain``: the
    model's logits on ``x`` when the caller already has them (saves one pass). The warps and the
    mean are fp32 under any autocast (``predict_logits`` hands back fp32)."""
    probs = (predict_logits(model, x) if plain is None else plain).softmax(1)
    for _ in range(views):
        # fp32 island: under autocast the warp's sampling grid (a batched matmul) would be bf16,
        # off by up to 0.06 in pixel intensity; the warp is made as in fp32, only the model is lowered
        with torch.autocast(x.device.type, enabled=False):
            warped = random_affine(x, TTA_SPEC, generator)
        probs += predict_logits(model, warped).softmax(1)
    return (probs / (views + 1)).log()


@torch.no_grad()
def extract_features(encoder: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    return predict_logits(encoder, x, batch_size)


def evaluate_split(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    tta_views: int = 0,
    seed: int = 0,
    precision: Precision | None = None,
) -> tuple[dict[int, float], torch.Tensor]:
    """Top-k and confusion matrix; with ``tta_views``, of the test-time-augmented predictions (the
    model's forward under ``precision``, None: fp32)."""
    with precision_context(precision):
        if tta_views:
            logits = predict_tta(model, x, tta_views, torch.Generator(x.device).manual_seed(seed))
        else:
            logits = predict_logits(model, x)
    return topk_accuracy(logits, y), confusion_matrix(y.cpu(), logits.argmax(1).cpu())


def single_view_metrics(topk: dict[int, float]) -> dict[str, float]:
    """A test-time-augmented job's single-view test top-k, under the names the report reads."""
    return {f"test_plain_top{k}": value for k, value in topk.items()}


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, n_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Counts with true classes on rows and predicted classes on columns."""
    flat = targets.long() * n_classes + predictions.long()
    return torch.bincount(flat.cpu(), minlength=n_classes * n_classes).view(n_classes, n_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.diag().float() / matrix.sum(dim=1).clamp(min=1).float()


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.1,
    n_classes: int = NUM_CLASSES,
    chunk: int = 2048,
) -> torch.Tensor:
    """Class scores of a cosine-similarity kNN with exp(sim / T) weighted votes.

    fp32 island: under a caller's autocast too (a kNN head inside a bf16 classifier), since
    exp(sim / T) at T = 0.1 turns bf16's rounding of a similarity into a 4% change of a vote."""
    with torch.autocast(query_features.device.type, enabled=False):
        bank = F.normalize(train_features.float(), dim=1)
        k = min(k, bank.shape[0])
        scores = []
        for start in range(0, query_features.shape[0], chunk):
            q = F.normalize(query_features[start : start + chunk].float(), dim=1)
            sim, idx = (q @ bank.T).topk(k, dim=1)
            weights = (sim / temperature).exp()
            votes = torch.zeros(q.shape[0], n_classes, device=q.device)
            votes.scatter_add_(1, train_labels[idx], weights)
            scores.append(votes)
    return torch.cat(scores)
