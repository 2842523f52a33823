"""FixMatch's pieces: pseudo-labels from weak views (thresholds, distribution alignment), the
consistency loss of one step, and the learning-rate schedule.

The weak view's prediction, computed without gradient by the online model (or its EMA), becomes
a hard pseudo-label when its confidence clears the threshold (``tau``, or FlexMatch's per-class
thresholds); the strong view is trained towards it with weight ``lambda_u``. Against confirmation
bias (one class absorbing another, sevens -> fours, measured on this project's runs) the weak
predictions can be aligned with the labeled class distribution before thresholding (ReMixMatch's
distribution alignment), and smoothed over the starting encoder's neighbourhoods of the pool
(``fewshot.semisup.neighbours``, with ``--graph-k``). Everything here reads images' predictions
and the labeled draw's labels only, never the pool's labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data import NUM_CLASSES
from fewshot.semisup.config import SemisupConfig
from fewshot.semisup.neighbours import NeighbourSmoother


@dataclass
class PseudoLabels:
    probs: torch.Tensor  # (N, C) class probabilities after alignment
    confidence: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,) hard labels
    mask: torch.Tensor  # (N,) 1.0 where the target counts, else 0.0


@torch.no_grad()
def aligned_probs(weak_logits: torch.Tensor, align: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of weak-view logits, times optional alignment factors (C,), renormalised."""
    probs = F.softmax(weak_logits.detach().float(), dim=1)
    if align is not None:
        probs = probs * align.view(1, -1)
        probs = probs / probs.sum(dim=1, keepdim=True)
    return probs


@torch.no_grad()
def pseudo_labels(
    weak_logits: torch.Tensor, thresholds: float | torch.Tensor, align: torch.Tensor | None = None
) -> PseudoLabels:
    """Hard targets from weak-view logits: softmax, optional alignment factors (C,), argmax, and a
    mask where the confidence reaches the threshold (a number, or one per predicted class)."""
    return threshold_probs(aligned_probs(weak_logits, align), thresholds)


def threshold_probs(probs: torch.Tensor, thresholds: float | torch.Tensor) -> PseudoLabels:
    """Argmax targets of class distributions and the mask of those at or above their threshold."""
    confidence, targets = probs.max(dim=1)
    threshold = thresholds[targets] if isinstance(thresholds, torch.Tensor) else thresholds
    mask = (confidence >= threshold).float()
    return PseudoLabels(probs, confidence, targets, mask)


class PseudoLabeler:
    """Thresholds and distribution alignment, with the state they keep between steps.

    Distribution alignment (ReMixMatch): weak probabilities are multiplied by
    ``p_target / p_model`` and renormalised, ``p_model`` being a running mean (momentum 0.999)
    of the model's weak predictions and ``p_target`` the labeled draw's class frequencies.
    FlexMatch thresholds: ``tau * M(beta_c)`` with ``M(x) = x / (2 - x)`` and ``beta_c`` the
    number of pool images last predicted as class c above ``tau``, over the largest such count
    (or over the number of pool images never predicted above ``tau``, while that is larger:
    the warm-up). Both read images' predictions only.
    """

    def __init__(self, cfg: SemisupConfig, p_target: torch.Tensor, n_pool: int, device: torch.device) -> None:
        self.tau = cfg.tau
        self.flexmatch = cfg.threshold == "flexmatch"
        self.align = cfg.dist_align
        self.momentum = 0.999
        self.p_target = p_target.float().to(device)
        self.p_model = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, device=device)
        self.memory = torch.full((n_pool,), -1, dtype=torch.int16, device=device) if self.flexmatch else None
        self.smoother: NeighbourSmoother | None = None  # set by the trainer with --graph-k

    def thresholds(self) -> float | torch.Tensor:
        if self.memory is None:
            return self.tau
        used = self.memory[self.memory >= 0].long()
        counts = torch.bincount(used, minlength=NUM_CLASSES).float()
        unused = float((self.memory < 0).sum())
        denominator = max(float(counts.max()), unused, 1.0)
        beta = counts / denominator
        return self.tau * beta / (2 - beta)

    @torch.no_grad()
    def __call__(self, weak_logits: torch.Tensor, pool_positions: torch.Tensor) -> PseudoLabels:
        thresholds = self.thresholds()
        align = None
        if self.align:
            raw = F.softmax(weak_logits.detach().float(), dim=1)
            self.p_model.mul_(self.momentum).add_(raw.mean(dim=0), alpha=1 - self.momentum)
            align = self.p_target / self.p_model
        probs = aligned_probs(weak_logits, align)
        if self.smoother is not None:
            probs = self.smoother(probs, pool_positions)
        result = threshold_probs(probs, thresholds)
        if self.memory is not None:
            over = result.confidence > self.tau
            self.memory[pool_positions[over]] = result.targets[over].to(torch.int16)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "p_model": self.p_model.cpu().clone(),
            # copies: both memories change every step, and .cpu() of a CPU tensor is the tensor itself
            "memory": None if self.memory is None else self.memory.cpu().clone(),
            "smoother": None if self.smoother is None else self.smoother.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_model.copy_(state["p_model"])
        if self.memory is not None:
            self.memory.copy_(state["memory"])


@dataclass
class StepOutput:
    loss: torch.Tensor
    sup_loss: torch.Tensor
    unsup_loss: torch.Tensor
    pseudo: PseudoLabels


def consistency_loss(
    model: nn.Module,
    teacher: nn.Module,
    x_labeled: torch.Tensor,
    y_labeled: torch.Tensor,
    u_weak: torch.Tensor,
    u_strong: torch.Tensor,
    pool_positions: torch.Tensor,
    labeler: PseudoLabeler,
    lambda_u: float,
) -> StepOutput:
    """Supervised cross-entropy on the labeled batch plus ``lambda_u`` times the masked
    cross-entropy of the strong views against the weak views' pseudo-labels.

    The weak views go through ``teacher`` (the model itself, or its EMA) under ``no_grad``: no
    gradient reaches the targets. The labeled and strong batches share one forward pass (and so
    their batch-norm statistics), as in FixMatch.
    """
    with torch.no_grad():
        weak_logits = teacher(u_weak)
    pseudo = labeler(weak_logits, pool_positions)
    n = x_labeled.shape[0]
    # fp32 island: the losses from fp32 logits (a no-op cast under fp32; the pseudo-labels too)
    logits = model(torch.cat([x_labeled, u_strong])).float()
    sup = F.cross_entropy(logits[:n], y_labeled)
    per_image = F.cross_entropy(logits[n:], pseudo.targets, reduction="none")
    unsup = (per_image * pseudo.mask).mean()
    return StepOutput(sup + lambda_u * unsup, sup.detach(), unsup.detach(), pseudo)


def fixmatch_lr(base: float, step: int, total: int) -> float:
    """FixMatch's schedule: ``base * cos(7 pi step / (16 total))`` (ends at about 0.2 base)."""
    return base * math.cos(7 * math.pi * step / (16 * max(1, total)))
