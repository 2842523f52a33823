"""The semi-supervised classifier: built from an encoder, its head warmed up, its optimizer, its EMA
copy, how it is scored (single view or with test-time augmentation) and described when logged."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data import NUM_CLASSES, to_unit
from fewshot.device import Precision, place, precision_context
from fewshot.errors import UserError
from fewshot.evaluate import eval_mode, predict_logits, predict_tta
from fewshot.linear_head import FeatureSet, encode, train_linear_head
from fewshot.models import ENCODERS, DigitEncoder, EncoderClassifier, ResNetEncoder, build_encoder
from fewshot.semisup.config import SemisupConfig
from fewshot.semisup.data import SemisupData
from fewshot.train import FitConfig


class EMA:
    """An exponential moving average of a model's weights (buffers copied), in eval mode.

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so the average follows the
    model closely at the start instead of lagging behind a fresh head for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # fp32 island: the weights are fp32 whatever the autocast (it lowers op inputs, never the
        # parameters), and this runs outside it; in bf16 a step of (1 - decay) = 0.1% would round away
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.mul_(d).add_(p.detach(), alpha=1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


def build_model(cfg: SemisupConfig, encoder: nn.Module | None, device: torch.device) -> EncoderClassifier:
    """A trainable copy of ``encoder`` (or a fresh ``arch``/``width`` encoder) with a fresh head."""
    torch.manual_seed(cfg.seed)
    if encoder is None:
        encoder = build_encoder(cfg.arch, cfg.width)
    else:
        encoder = copy.deepcopy(encoder)
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    return place(EncoderClassifier(encoder), device)


def warm_start_head(model: EncoderClassifier, data: SemisupData, seed: int) -> None:
    """Replace the head with a linear probe fitted on the frozen encoder's features (eval mode) of
    the labeled train split, early-stopped on the validation split, so that the first
    pseudo-labels of a pretrained encoder mean something. No standardisation: folded into the
    head it would blow up once batch-norm switches to batch statistics in training."""
    encoder = model.encoder
    with eval_mode(encoder):
        train_f, val_f = encode(encoder, data.x_train), encode(encoder, data.x_val)
    features = FeatureSet(train_f, data.y_train, val_f, data.y_val, test=train_f[:0], y_test=data.y_train[:0])
    fit_cfg = FitConfig(epochs=300, lr=3e-3, batch_size=train_f.shape[0], progress=False)
    generator = torch.Generator(train_f.device).manual_seed(seed)
    head, _ = train_linear_head(features, fit_cfg, standardize=False, generator=generator)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)


def prepare_model(cfg: SemisupConfig, data: SemisupData, encoder: nn.Module | None) -> EncoderClassifier:
    """``build_model`` then, with ``cfg.head_warmup``, the linear-probe head."""
    model = build_model(cfg, encoder, data.x_train.device)
    if cfg.head_warmup and encoder is not None:  # random features have nothing to probe
        warm_start_head(model, data, cfg.seed)
    return model


def make_optimizer(cfg: SemisupConfig, model: EncoderClassifier) -> torch.optim.Optimizer:
    """Two learning rates (encoder, head) times two weight-decay groups (none on biases and norms)."""
    groups = []
    for part, ratio in ((model.encoder, cfg.encoder_lr_ratio), (model.head, 1.0)):
        decay = [p for p in part.parameters() if p.ndim > 1]
        plain = [p for p in part.parameters() if p.ndim <= 1]
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr_ratio": ratio})
        groups.append({"params": plain, "weight_decay": 0.0, "lr_ratio": ratio})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def with_clean_batchnorm(
    model: EncoderClassifier,
    pool: torch.Tensor,
    n_images: int,
    precision: Precision | None = None,
    batch_size: int = 500,
) -> EncoderClassifier:
    """A copy of ``model`` (eval mode) whose batch-norm running statistics are re-estimated, as plain
    averages over batches, from forward passes of the first ``n_images`` pool images (uint8, clean:
    no augmentation). The weights are the model's; the original is not touched."""
    copied = copy.deepcopy(model)
    norms = [m for m in copied.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    copied.train()
    images = pool[: min(n_images, pool.shape[0])]
    with precision_context(precision):
        # near-equal batches: each counts the same in the average, and none is a lone image
        for batch in torch.tensor_split(images, math.ceil(images.shape[0] / batch_size)):
            copied(to_unit(batch))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return copied.eval()


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision | None = None
) -> tuple[float, float, torch.Tensor]:
    """(top-1, mean cross-entropy, logits) of ``model`` in eval mode (its forward under ``precision``)."""
    with eval_mode(model), precision_context(precision):
        logits = predict_logits(model, x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y)), logits


def final_test_scores(model: nn.Module, x: torch.Tensor, cfg: SemisupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scores reported, the model's own single-view logits): with ``cfg.tta_views`` the reported
    scores average mildly warped copies of each image (seeded by ``cfg.seed``), as the CNN baseline's.
    The model runs under ``cfg.precision``."""
    with Precision.choose(cfg.precision, x.device).autocast():
        plain = predict_logits(model, x)
        if not cfg.tta_views:
            return plain, plain
        generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
        return predict_tta(model, x, cfg.tta_views, generator, plain), plain


def encoder_arch(encoder: nn.Module) -> tuple[str, int]:
    """(arch, width) that ``build_encoder`` needs to rebuild ``encoder``."""
    if isinstance(encoder, DigitEncoder):
        return "digit", encoder.feature_dim // 4
    if isinstance(encoder, ResNetEncoder):
        return ("resnet18" if encoder.feature_dim == 512 else "resnet50"), 0
    raise UserError(
        f"--init: an encoder of type {type(encoder).__name__} cannot be logged; use one of {', '.join(ENCODERS)}"
    )


def model_spec(model: EncoderClassifier) -> dict[str, Any]:
    arch, width = encoder_arch(model.encoder)
    return {"kind": "encoder_classifier", "arch": arch, "width": width, "feature_dim": model.encoder.feature_dim,
            "head": "semisup", "num_classes": NUM_CLASSES}  # fmt: skip
