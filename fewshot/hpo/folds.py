"""The labeled images a search may look at, and how they are split for scoring.

The objective only ever sees a ``LabeledSet``: the 100 labeled training images and their
labels. The test set is not part of it; it is loaded for the winner only, after the search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from fewshot.data import MNIST, LabeledDraw, to_unit
from fewshot.errors import UserError


@dataclass(frozen=True)
class Split:
    """Positions into a LabeledSet: fit on ``train``, score on ``val``."""

    train: torch.Tensor
    val: torch.Tensor


@dataclass(frozen=True)
class LabeledSet:
    """The labeled draw's images ([0, 1], N x 1 x 28 x 28) and labels, train split first."""

    x: torch.Tensor
    y: torch.Tensor
    n_train: int  # the first n_train rows are the draw's train split, the rest its validation split

    @classmethod
    def from_draw(cls, mnist: MNIST, draw: LabeledDraw, device: torch.device) -> LabeledSet:
        idx = torch.cat([draw.train_idx, draw.val_idx])
        return cls(to_unit(mnist.train_images[idx], device), mnist.train_labels[idx].to(device), len(draw.train_idx))


def make_splits(labeled: LabeledSet, folds: int, seed: int) -> list[Split]:
    """Stratified k-fold over all labeled images (``folds`` >= 2), or the draw's own 75/25 split (0)."""
    n = labeled.y.shape[0]
    if folds == 0:
        return [Split(torch.arange(labeled.n_train), torch.arange(labeled.n_train, n))]
    y = labeled.y.cpu().numpy()
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min()) if y.size else 0
    if smallest < folds:
        raise UserError(
            f"--folds {folds}: a class has only {smallest} labeled images; use at most {max(smallest, 2)} folds "
            "or --folds 0 (the validation split)"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [Split(torch.from_numpy(tr), torch.from_numpy(va)) for tr, va in splitter.split(np.zeros(n), y)]
