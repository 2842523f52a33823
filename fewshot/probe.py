"""Downstream probes of a pretrained encoder on the labeled draw: linear, kNN, fine-tuning.

Each probe is a function ``ProbeContext -> ProbeResult`` in ``PROBES``; a new probe (say one
that also uses the unlabeled pool, reachable through ``ctx.mnist`` and ``ctx.draw``) is one
more entry. The linear protocol follows MoCo's: every encoder parameter frozen, batch-norm in
eval mode, a linear head on the pooled features, and a check afterwards that the frozen
weights are bit-identical to those loaded.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from fewshot import augment as aug
from fewshot.data import MNIST, NUM_CLASSES, LabeledDraw, to_unit
from fewshot.device import Precision, place, precision_context
from fewshot.evaluate import EVAL_BATCH, extract_features, knn_scores, predict_logits, predict_tta
from fewshot.models import EncoderClassifier
from fewshot.train import Augment, EpochCallback, FitConfig, FitResult, fit

if TYPE_CHECKING:  # a plain dataclass; importing fewshot.baseline would pull in mlflow
    from fewshot.baseline import LabeledTensors


# the frozen probes read the encoder's last map average-pooled to 2x2 (512 values at width 32)
# rather than 1x1: +0.6 points linear, +2.0 kNN on the CPU default encoder (README, probes)
DEFAULT_FEATURE_GRID = 2


class FrozenWeightsChanged(RuntimeError):
    """The frozen encoder's weights or batch-norm statistics moved during a frozen probe (a bug)."""


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


# ---------------------------------------------------------------- frozen weights


def freeze(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Turn off gradients, switch to eval mode; return a snapshot of every weight and buffer."""
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    encoder.eval()
    return {name: value.detach().clone() for name, value in encoder.state_dict().items()}


def check_unchanged(encoder: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Raise FrozenWeightsChanged unless every tensor equals the snapshot bit for bit."""
    state = encoder.state_dict()
    moved = [name for name, value in snapshot.items() if not torch.equal(state[name], value)]
    if set(state) != set(snapshot) or moved:
        raise FrozenWeightsChanged(f"frozen encoder changed during the probe: {', '.join(moved[:5]) or 'keys differ'}")


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


def _held_out(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
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
        result = fit(head, (features.train, features.y_train), _held_out(features.val, features.y_val), cfg,
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
    result = fit(model, (images.x_train, images.y_train), _held_out(images.x_val, images.y_val), cfg, generator,
                 augment=augment_fn, on_epoch=on_epoch, params=head.parameters(), precision=precision)  # fmt: skip
    return fold(head).eval(), result


# ---------------------------------------------------------------- kNN head


class KNNHead(nn.Module):
    """Weighted cosine kNN over a bank of labeled features, as a module: features -> class scores."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, k: int, temperature: float) -> None:
        super().__init__()
        self.register_buffer("bank", bank.detach().clone())
        self.register_buffer("labels", labels.detach().clone())
        self.k = k
        self.temperature = temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return knn_scores(self.bank, self.labels, features, self.k, self.temperature)


# ---------------------------------------------------------------- the probe interface


@dataclass
class ProbeSettings:
    fit: FitConfig = field(default_factory=FitConfig)
    standardize: bool = True
    augment: bool = False  # linear: features of augmented images; fine-tuning always augments
    augment_view: str = "strong"  # "affine" (a mild random affine) or "strong" (augment.STRONG_DIGITS + crossbars)
    refit: bool = True  # linear and fine-tuning: after early stopping, retrained on all 100 labels
    normalize: bool = True  # linear and fine-tuning heads: features L2-normalised first
    augment_strength: float = 1.0
    bar: float = 0.3  # strong view: share of images given a crossbar (augment.crossbar)
    knn_k: int = 20
    knn_temperature: float = 0.1
    encoder_lr_ratio: float = 0.1  # fine-tuning: encoder lr = lr * ratio
    tta_views: int = 0  # fine-tuning: test scores average the image and this many mildly warped copies


@dataclass
class ProbeContext:
    encoder: nn.Module  # frozen by the caller for frozen probes
    features: FeatureSet
    images: LabeledTensors  # [0, 1] images of the labeled draw and the test set
    settings: ProbeSettings
    generator: torch.Generator
    device: torch.device
    mnist: MNIST | None = None  # the unlabeled pool, for probes that use it
    draw: LabeledDraw | None = None
    on_epoch: EpochCallback | None = None
    # the encoder's forward passes (None: fp32); heads trained on cached features stay fp32
    precision: Precision | None = None


@dataclass
class ProbeResult:
    classifier: nn.Module  # [0, 1] images -> class scores (an EncoderClassifier)
    head: nn.Module  # pooled features -> class scores
    val_scores: torch.Tensor
    test_scores: torch.Tensor
    fit: FitResult | None
    head_seconds: float  # wall time of training (kNN: building the bank)
    frozen: bool  # the encoder was frozen (and checked unchanged by the caller)
    plain_test_scores: torch.Tensor | None = None  # the classifier's own test scores when test_scores are TTA's


Probe = Callable[[ProbeContext], ProbeResult]


def _classifier(encoder: nn.Module, head: nn.Module) -> EncoderClassifier:
    classifier = EncoderClassifier(encoder)
    classifier.head = head
    return classifier.eval()


def _augmentation(settings: ProbeSettings) -> Augment:
    if settings.augment_view == "strong":
        spec = replace(aug.STRONG_DIGITS.scaled(settings.augment_strength), bar_probability=settings.bar)
        return aug.OnlineView(spec)
    return aug.OnlineAffine(aug.AffineSpec().scaled(settings.augment_strength))


def _train_linear(
    ctx: ProbeContext, features: FeatureSet, images: LabeledTensors, cfg: FitConfig, on_epoch: EpochCallback | None
) -> tuple[nn.Module, FitResult]:
    settings = ctx.settings
    if settings.augment:
        return train_linear_head_augmented(
            ctx.encoder, images, features, cfg, settings.standardize, _augmentation(settings), ctx.generator, on_epoch,
            settings.normalize, ctx.precision,
        )  # fmt: skip
    return train_linear_head(features, cfg, settings.standardize, ctx.generator, on_epoch, settings.normalize)


def linear_probe(ctx: ProbeContext) -> ProbeResult:
    """The head trained on the 75 training labels, early-stopped on the 25 validation labels
    (their scores are the held-out ones reported); with ``refit``, a fresh head is then trained
    on all 100 labels for as many epochs, as the supervised baselines do."""
    settings, started = ctx.settings, time.perf_counter()
    head, result = _train_linear(ctx, ctx.features, ctx.images, settings.fit, ctx.on_epoch)
    with torch.no_grad():
        val_scores = head(ctx.features.val)
    if settings.refit:
        refit_cfg = replace(settings.fit, epochs=result.epochs_run, patience=0)
        head, _ = _train_linear(ctx, ctx.features.all_labels(), ctx.images.all_labels(), refit_cfg, None)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        test_scores = head(ctx.features.test)
    return ProbeResult(_classifier(ctx.encoder, head), head, val_scores, test_scores, result, seconds, frozen=True)


def knn_probe(ctx: ProbeContext) -> ProbeResult:
    """Weighted kNN with the 75 training labels as the bank (validation stays held out)."""
    started = time.perf_counter()
    head = KNNHead(ctx.features.train, ctx.features.y_train, ctx.settings.knn_k, ctx.settings.knn_temperature)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        val_scores, test_scores = head(ctx.features.val), head(ctx.features.test)
    return ProbeResult(_classifier(ctx.encoder, head), head, val_scores, test_scores, None, seconds, frozen=True)


def finetune_probe(ctx: ProbeContext) -> ProbeResult:
    """Linear probe first (a good head to start from), then encoder and head trained together on
    augmented labeled images, the encoder at ``lr * encoder_lr_ratio``; batch-norm in train mode.
    Early-stopped on the 25 validation labels (their scores are the held-out ones reported); with
    ``refit``, the same recipe is then rerun from the loaded encoder on all 100 labels for as many
    epochs, and with ``tta_views`` the test scores average warped copies, as the supervised CNN
    baseline does both."""
    settings, started = ctx.settings, time.perf_counter()
    if settings.fit.optimizer == "lbfgs":
        from fewshot.errors import UserError

        raise UserError(
            "--optimizer lbfgs: L-BFGS has one learning rate for all parameters; fine-tune with adamw or sgd"
        )
    classifier, result = _finetune(ctx, ctx.features, ctx.images, settings.fit, ctx.on_epoch)
    with precision_context(ctx.precision):
        val_scores = predict_logits(classifier, ctx.images.x_val)
    if settings.refit:
        refit_cfg = replace(settings.fit, epochs=result.epochs_run, patience=0)
        classifier, _ = _finetune(ctx, ctx.features.all_labels(), ctx.images.all_labels(), refit_cfg, None)
    seconds = time.perf_counter() - started
    classifier.eval()
    with precision_context(ctx.precision):
        test_scores = plain = predict_logits(classifier, ctx.images.x_test)
        if settings.tta_views:
            test_scores = predict_tta(classifier, ctx.images.x_test, settings.tta_views, ctx.generator, plain)
    return ProbeResult(classifier, classifier.head, val_scores, test_scores, result, seconds, frozen=False,
                       plain_test_scores=plain if settings.tta_views else None)  # fmt: skip


def _finetune(
    ctx: ProbeContext, features: FeatureSet, images: LabeledTensors, cfg: FitConfig, on_epoch: EpochCallback | None
) -> tuple[EncoderClassifier, FitResult]:
    """A trainable copy of the loaded encoder under a linear head fitted on ``features``, trained on
    ``images`` (early-stopped on their validation split when there is one)."""
    settings = ctx.settings
    head, _ = train_linear_head(features, cfg, settings.standardize, ctx.generator, normalize=settings.normalize)
    encoder = copy.deepcopy(ctx.encoder)
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    classifier = _classifier(encoder, head)
    groups = [
        {"params": list(classifier.encoder.parameters()), "lr": cfg.lr * settings.encoder_lr_ratio},
        {"params": list(classifier.head.parameters()), "lr": cfg.lr},
    ]
    val = _held_out(images.x_val, images.y_val)
    result = fit(classifier, (images.x_train, images.y_train), val, cfg, ctx.generator, augment=_augmentation(settings),
                 on_epoch=on_epoch, params=groups, precision=ctx.precision)  # fmt: skip
    return classifier, result


def semisup_probe(ctx: ProbeContext) -> ProbeResult:
    """Semi-supervised fine-tuning with the unlabeled pool (``fewshot.semisup``), ``--epochs`` read as steps."""
    from fewshot.semisup import semisup_probe as run  # imported late: fewshot.semisup imports this module

    return run(ctx)


PROBES: dict[str, Probe] = {
    "linear": linear_probe, "knn": knn_probe, "finetune": finetune_probe, "semisup": semisup_probe,
}  # fmt: skip


def run_probe(name: str, ctx: ProbeContext) -> ProbeResult:
    """Run probe ``name``; frozen probes are checked to leave the encoder bit-identical."""
    snapshot = freeze(ctx.encoder)
    result = PROBES[name](ctx)
    check_unchanged(ctx.encoder, snapshot)  # fine-tuning trains a copy: the loaded encoder must not move either
    return result
