"""Downstream probes of a pretrained encoder on the labeled draw: linear, kNN, fine-tuning, semi-supervised.

Each probe is a function ``ProbeContext -> ProbeResult`` in ``PROBES``; a new probe is one more
function and one more entry (``semisup_probe``, at the end, shows one that also uses the
unlabeled pool through ``ctx.mnist`` and ``ctx.draw``). The linear protocol follows MoCo's: every
encoder parameter frozen, batch-norm in eval mode, a linear head on the pooled features
(``fewshot.linear_head``), and a check afterwards that the frozen weights are bit-identical to
those loaded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fewshot import augment as aug
from fewshot.data import MNIST, LabeledDraw, LabeledTensors
from fewshot.device import Precision, precision_context
from fewshot.errors import UserError
from fewshot.evaluate import knn_scores, predict_logits, predict_tta
from fewshot.linear_head import (  # L2Normalize, Standardize: pickled heads logged by earlier versions name them here
    FeatureSet,
    L2Normalize,  # noqa: F401
    Standardize,  # noqa: F401
    held_out,
    train_linear_head,
    train_linear_head_augmented,
)
from fewshot.models import EncoderClassifier
from fewshot.semisup import SemisupConfig, prepare_model, semisup_data, train_semisup
from fewshot.train import Augment, EpochCallback, FitConfig, FitResult, fit

# the frozen probes read the encoder's last map average-pooled to 2x2 (512 values at width 32)
# rather than 1x1: +0.6 points linear, +2.0 kNN on the CPU default encoder (docs/benchmarks.md, read-out ablation)
DEFAULT_FEATURE_GRID = 2
# the linear probe also reads the map before the last down-sampling (the digit encoder's 14x14): the pick of
# the labels' repeated 5-fold CV over MoCo recipes and read-outs (stop 26, docs/benchmarks.md); kNN and
# fine-tuning keep the last map, where no such comparison was made
LINEAR_FEATURE_MAPS = 2


def default_feature_maps(probe: str, arch: str = "digit") -> int:
    """How many feature maps a probe reads by default: two for the linear probe on the digit encoder."""
    return LINEAR_FEATURE_MAPS if probe == "linear" and arch == "digit" else 1


class FrozenWeightsChanged(RuntimeError):
    """The frozen encoder's weights or batch-norm statistics moved during a frozen probe (a bug)."""


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
    val = held_out(images.x_val, images.y_val)
    result = fit(classifier, (images.x_train, images.y_train), val, cfg, ctx.generator, augment=_augmentation(settings),
                 on_epoch=on_epoch, params=groups, precision=ctx.precision)  # fmt: skip
    return classifier, result


def semisup_probe(ctx: ProbeContext) -> ProbeResult:
    """Semi-supervised fine-tuning with the unlabeled pool (``fewshot.semisup``) with its defaults,
    ``--epochs`` read as steps, starting from the probe's encoder (a copy; the loaded one is left untouched)."""
    if ctx.mnist is None or ctx.draw is None:
        raise UserError("--probe semisup: needs the unlabeled pool; pass mnist and draw in the probe context")
    started = time.perf_counter()
    steps = ctx.settings.fit.epochs
    cfg = SemisupConfig(
        init="probe", steps=steps, eval_every=steps, eval_test=False, seed=ctx.draw.seed,
        progress=ctx.settings.fit.progress, precision=ctx.precision.name if ctx.precision else "fp32",
    )  # fmt: skip
    data = semisup_data(ctx.mnist, ctx.draw, ctx.device)
    model = prepare_model(cfg, data, ctx.encoder)
    classifier = train_semisup(cfg, data, model).model
    val_scores = predict_logits(classifier, data.x_val)
    test_scores = predict_logits(classifier, ctx.images.x_test)
    seconds = time.perf_counter() - started
    return ProbeResult(classifier, classifier.head, val_scores, test_scores, None, seconds, frozen=False)


PROBES: dict[str, Probe] = {
    "linear": linear_probe, "knn": knn_probe, "finetune": finetune_probe, "semisup": semisup_probe,
}  # fmt: skip


def run_probe(name: str, ctx: ProbeContext) -> ProbeResult:
    """Run probe ``name``; frozen probes are checked to leave the encoder bit-identical."""
    snapshot = freeze(ctx.encoder)
    result = PROBES[name](ctx)
    check_unchanged(ctx.encoder, snapshot)  # fine-tuning trains a copy: the loaded encoder must not move either
    return result
