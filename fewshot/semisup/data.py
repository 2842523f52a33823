"""The images a semi-supervised run trains on: the labeled split and the unlabeled pool."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fewshot.data import MNIST, LabeledDraw, LabeledTensors, labeled_tensors


@dataclass(kw_only=True)
class SemisupData(LabeledTensors):
    """The labeled tensors ([0, 1]) plus the unlabeled pool (uint8) and, for monitoring only, its labels."""

    pool: torch.Tensor  # (N, 28, 28) uint8, the unlabeled images
    pool_idx: torch.Tensor  # their indices into the MNIST training set
    pool_labels: torch.Tensor | None = None  # monitoring only: never reaches the loss

    def with_validation_in_training(self) -> SemisupData:
        """The 25 validation images join the labeled training images (a refit); the validation split
        stays for monitoring, now in-sample."""
        x, y = torch.cat([self.x_train, self.x_val]), torch.cat([self.y_train, self.y_val])
        return replace(self, x_train=x, y_train=y)


def semisup_data(mnist: MNIST, draw: LabeledDraw, device: torch.device | str, with_test: bool = True) -> SemisupData:
    """The draw's 75/25 labeled split and its unlabeled pool; refuses a pool that overlaps the labels."""
    labeled = set(draw.labeled_idx.tolist())
    if labeled & set(draw.unlabeled_idx.tolist()):
        raise RuntimeError("the unlabeled pool contains labeled images; the draw is inconsistent")
    has_test = with_test and mnist.test_images.shape[0] > 0
    return SemisupData(
        **vars(labeled_tensors(mnist, draw, device, with_test=has_test)),
        pool=mnist.train_images[draw.unlabeled_idx].to(device),
        pool_idx=draw.unlabeled_idx.clone(),
        pool_labels=mnist.train_labels[draw.unlabeled_idx].to(device),
    )
