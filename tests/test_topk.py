"""Top-k accuracy on hand-made scores: ties, k beyond the number of classes, agreement with argmax."""

from __future__ import annotations

import pytest
import torch

from fewshot.evaluate import confusion_matrix, topk_accuracy


def test_topk_counts_rank_of_the_target() -> None:
    logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0],  # target 0: rank 0
            [5.0, 4.0, 3.0, 2.0],  # target 2: rank 2
            [1.0, 2.0, 3.0, 4.0],  # target 0: rank 3
            [0.0, 9.0, 1.0, 2.0],  # target 3: rank 1
        ]
    )
    targets = torch.tensor([0, 2, 0, 3])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 3, 4))
    assert acc == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_ties_go_to_the_lower_class_like_argmax() -> None:
    logits = torch.tensor(
        [
            [1.0, 1.0, 1.0],  # all tied: class 0 wins, then 1, then 2
            [1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [0.0, 2.0, 2.0],  # tie between 1 and 2 at the top: 1 first
        ]
    )
    targets = torch.tensor([0, 1, 2, 2])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 3))
    assert acc[1] == 0.25  # only row 0 (row 3's target 2 loses the tie to 1)
    assert acc[2] == 0.75  # rows 0, 1 and 3
    assert acc[3] == 1.0
    # top-1 is exactly the confusion matrix diagonal, ties included
    matrix = confusion_matrix(targets, logits.argmax(1), n_classes=3)
    assert acc[1] == matrix.diag().sum().item() / len(targets)


def test_k_larger_than_the_classes_and_nan_scores() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [float("nan"), 0.0]])
    targets = torch.tensor([0, 0, 0])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 5, 10))
    assert acc[1] == pytest.approx(1 / 3)  # row 1 only; a NaN score never counts
    assert acc[2] == acc[5] == acc[10] == pytest.approx(2 / 3)
    assert topk_accuracy(logits[:2], targets[:2], ks=(5,)) == {5: 1.0}


def test_topk_is_not_the_reports_broken_indexing() -> None:
    """The report's helper read correct[:, k] (one column) instead of correct[:k]: top-2 must
    include top-1 hits."""
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    targets = torch.tensor([0, 1])
    acc = topk_accuracy(logits, targets, ks=(1, 2, 3))
    assert acc == {1: 0.5, 2: 1.0, 3: 1.0}
    assert all(acc[a] <= acc[b] for a, b in ((1, 2), (2, 3)))
