"""Linear heads on encoder features: the features computed once (``FeatureSet``), the head (a
standardisation, optionally behind an L2 normalisation, then one linear layer), its training on
cached features or on features of freshly augmented images, and folding it into one nn.Linear.

A leaf: the probes (``fewshot.probe``), the semi-supervised head warm-up and the searches use it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from fewshot.data import MNIST, NUM_CLASSES, LabeledDraw, LabeledTensors, to_unit
from fewshot.device import Precision, place, precision_context
from fewshot.evaluate import EVAL_BATCH, extract_features
from fewshot.train import Augment, EpochCallback, FitConfig, FitResult, fit

# ---------------------------------------------------------------- features, computed once


@dataclass
class FeatureSet:
    """Pooled features of the labeled train / validation images and the test set."""

    train: torch.Tensor
    y_train: torch.Tensor
    val: torch.Tensor
    y_val: torch.Tensor
    test: torch.Tensor
    y_test: torch.Tensor
    seconds: float = 0.0

    @property
    def feature_dim(self) -> int:
        return self.train.shape[1]

    def all_labels(self) -> FeatureSet:
        """Train and validation together as the training set (for a refit); no validation left."""
        train, y_train = torch.cat([self.train, self.val]), torch.cat([self.y_train, self.y_val])
        return replace(self, train=train, y_train=y_train, val=train[:0], y_val=y_train[:0])


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Features of [0, 1] images (N, 1, 28, 28) with the encoder in eval mode."""
    encoder.eval()
    return extract_features(encoder, images, batch_size)


@torch.no_grad()
def cached_features(
    encoder: nn.Module,
    mnist: MNIST,
    draw: LabeledDraw,
    device: torch.device | str,
    batch_size: int = 1000,
    precision: Precision | None = None,
) -> FeatureSet:
    """Features of the 75 train, 25 validation and 10,000 test images, computed once (the
    encoder under ``precision``, the features fp32)."""
    started = time.perf_counter()
    encoder = place(encoder, device).eval()

    def features_of(images: torch.Tensor) -> torch.Tensor:
        with precision_context(precision):
            return torch.cat(
                [
                    encode(encoder, to_unit(images[i : i + batch_size], device))
                    for i in range(0, images.shape[0], batch_size)
                ]
            )

    result = FeatureSet(
        train=features_of(mnist.train_images[draw.train_idx]),
        y_train=mnist.train_labels[draw.train_idx].to(device),
        val=features_of(mnist.train_images[draw.val_idx]),
        y_val=mnist.train_labels[draw.val_idx].to(device),
        test=features_of(mnist.test_images),
        y_test=mnist.test_labels.to(device),
    )
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- linear head


class Standardize(nn.Module):
    """(x - mean) / std with statistics fixed at construction."""

    def __init__(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(dim=0))
        self.register_buffer("std", features.std(dim=0, unbiased=False).clamp(min=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class L2Normalize(nn.Module):
    """Features scaled to unit length: the sphere MoCo's contrastive loss works on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


def fold(head: nn.Module) -> nn.Module:
    """``head`` (a Linear, or Standardize + Linear, optionally behind L2Normalize) as one
    nn.Linear on its input, still behind L2Normalize when it had one."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head[0], L2Normalize):
        return nn.Sequential(head[0], fold(head[1]))
    standardize, linear = head[0], head[1]
    folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
    with torch.no_grad():
        folded.weight.copy_(linear.weight / standardize.std)
        folded.bias.copy_(linear.bias - (linear.weight * standardize.mean / standardize.std).sum(dim=1))
    return folded


def new_head(
    features: torch.Tensor, standardize: bool, generator: torch.Generator, normalize: bool = False
) -> nn.Module:
    """A zero-bias linear head (seeded init), behind a standardisation fitted on ``features``,
    both behind an L2 normalisation when ``normalize``."""
    if normalize:
        return nn.Sequential(L2Normalize(), new_head(L2Normalize()(features), standardize, generator))
    linear = nn.Linear(features.shape[1], NUM_CLASSES).to(features.device)
    with torch.no_grad():
        bound = 1 / features.shape[1] ** 0.5
        weight = torch.rand(linear.weight.shape, generator=generator, device=generator.device) * 2 - 1
        linear.weight.copy_((weight * bound).to(features.device))
        linear.bias.zero_()
    return nn.Sequential(Standardize(features), linear) if standardize else linear


@contextlib.contextmanager
def _few_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the tiny matrices of a linear head on the CPU: threads only add
    synchronisation there, and on a busy machine they made 1,000 epochs 20x slower (1.2 s vs 24 s)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def held_out(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation pair for ``fit``; None (no early stopping) when a refit left none."""
    return (x, y) if len(x) else None


def train_linear_head(
    features: FeatureSet,
    cfg: FitConfig,
    standardize: bool,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    normalize: bool = False,
) -> tuple[nn.Module, FitResult]:
    """Fit a linear head on cached features with the shared loop (early stopping on the
    validation labels); returns it folded into one nn.Linear on raw (or L2-normalised) features."""
    head = new_head(features.train, standardize, generator, normalize)
    with _few_threads(features.train.device):
        result = fit(head, (features.train, features.y_train), held_out(features.val, features.y_val), cfg,
                     generator, on_epoch=on_epoch)  # fmt: skip
    return fold(head).eval(), result


class FrozenEncoderHead(nn.Module):
    """Frozen encoder (always in eval mode, no gradients) + trainable head, on images."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def train(self, mode: bool = True) -> FrozenEncoderHead:
        super().train(mode)
        self.encoder.eval()  # batch-norm keeps the pretrained statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder(x)
        # fp32 island: the head is all that trains here and costs nothing; bf16 (under a caller's
        # autocast) is for the frozen encoder only
        with torch.autocast(x.device.type, enabled=False):
            return self.head(features.float())


def train_linear_head_augmented(
    encoder: nn.Module,
    images: LabeledTensors,
    features: FeatureSet,
    cfg: FitConfig,
    standardize: bool,
    augment_fn: Augment,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
    normalize: bool = False,
    precision: Precision | None = None,
) -> tuple[nn.Module, FitResult]:
    """The linear head trained on features of freshly augmented labeled images each step (the
    frozen encoder's forward under ``precision``)."""
    head = new_head(features.train, standardize, generator, normalize)
    model = FrozenEncoderHead(encoder, head)
    result = fit(model, (images.x_train, images.y_train), held_out(images.x_val, images.y_val), cfg, generator,
                 augment=augment_fn, on_epoch=on_epoch, params=head.parameters(), precision=precision)  # fmt: skip
    return fold(head).eval(), result
