"""Semi-supervised fine-tuning with the unlabeled pool: FixMatch-style consistency training.

Each step draws a labeled batch (weak view) and an unlabeled batch seen twice, weakly and
strongly augmented. The weak view's prediction, computed without gradient by the online model
(or its EMA), becomes a hard pseudo-label when its confidence clears the threshold (``tau``,
or FlexMatch's per-class thresholds); the strong view is trained towards it with weight
``lambda_u``. Against the confirmation bias measured here (DESIGN.md: one class absorbing
another, sevens -> fours) the weak predictions can be aligned with the labeled class
distribution before thresholding (ReMixMatch's distribution alignment), the thresholds can be
made per class (FlexMatch) and the targets can come from the EMA model.

The unlabeled pool's true labels are only ever read by the monitor (pseudo-label accuracy,
logged for people to look at); the loss, the thresholds and every selection use images only.

``train_semisup`` is the plain API (no MLflow, used by the benchmark, the HPO target and the
``semisup`` probe); ``run_semisup`` wraps it in a tracked, resumable MLflow run.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fewshot import augment as aug
from fewshot.checkpoints import check_same_settings, load_checked, resolve_resume, save_atomic
from fewshot.data import MNIST, NUM_CLASSES, LabeledDraw, to_unit
from fewshot.device import Precision, check_precision, pick_device, place, precision_context
from fewshot.encoder_source import DEFAULT_ENCODER
from fewshot.errors import TrainingDiverged, UserError
from fewshot.evaluate import predict_logits, predict_tta
from fewshot.interrupts import StopAtStepBoundary
from fewshot.models import ENCODERS, DigitEncoder, EncoderClassifier, ResNetEncoder, build_encoder

RANDOM_INIT = "random"
THRESHOLDS = ("fixed", "flexmatch")
TARGET_MODELS = ("online", "ema")
OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_FORMAT = "fewshot-semisup-checkpoint"
CHECKPOINT_VERSION = 1
REGISTERED_MODEL = "fewshot-classifier"

# Weak view: a small affine (a few pixels of shift, a little rotation, scale and shear).
WEAK_SPEC = aug.AffineSpec(rotation=10.0, scale=(0.9, 1.1), translate=0.1, shear=5.0)
# Strong views, never flipped: "digits" (augment.STRONG_DIGITS) or "fixmatch", the calibration
# prototype's recipe (larger affine, erasing of up to half the side on every image, contrast).
STRONG_PRESETS: dict[str, aug.ViewSpec] = {
    "digits": aug.STRONG_DIGITS,
    "fixmatch": aug.ViewSpec(
        crop_scale=(0.7, 1.2), rotation=30.0, shear=15.0, jitter=0.5, blur_probability=0.0,
        erase_probability=1.0, erase_fraction=0.5,
    ),
}  # fmt: skip

Metrics = dict[str, float]
EvalCallback = Callable[[int, Metrics], None]


@dataclass
class SemisupConfig:
    """Everything that shapes a semi-supervised run; ``validate`` checks it at the door."""

    init: str = DEFAULT_ENCODER  # a MoCo encoder (models:/..., runs:/..., checkpoint) or "random"
    arch: str = "digit"  # random init only; a pretrained encoder brings its own
    width: int = 32
    steps: int = 1000  # 500 against 1000 steps over 5 draws: README, semi-supervised
    epochs: float = 0.0  # > 0: passes over the unlabeled pool instead of --steps
    batch_size: int = 32  # labeled images per step (drawn with replacement from the train split)
    mu: int = 7  # unlabeled images per step = mu * batch_size
    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 5e-4  # not applied to biases and batch-norm weights
    encoder_lr_ratio: float = 1.0  # the encoder's lr is lr * ratio (the head always gets lr)
    tau: float = 0.95
    lambda_u: float = 1.0
    threshold: str = "fixed"
    dist_align: bool = True
    targets: str = "online"
    ema: float = 0.999  # EMA of the weights for evaluation (and targets with targets=ema); 0: none
    strong: str = "digits"
    strong_strength: float = 1.0
    weak_strength: float = 1.0
    bar: float = 0.3  # share of labeled and strong views given a crossbar (augment.crossbar)
    head_warmup: bool = True  # pretrained init: start from a linear head fitted on the frozen features
    eval_every: int = 100
    eval_test: bool = True  # test top-1 at every evaluation (monitoring; never used to choose)
    tta_views: int = 8  # final test scores average the image and this many mildly warped copies (as the CNN's)
    seed: int = 0
    data_dir: str | None = None
    labels_per_class: int | None = 10
    n_labels: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device does bf16 natively, else fp32 (fewshot.device)
    progress: bool = True

    @property
    def random_init(self) -> bool:
        return self.init.strip() == RANDOM_INIT

    @property
    def unlabeled_batch(self) -> int:
        return self.mu * self.batch_size

    def total_steps(self, n_pool: int) -> int:
        if self.epochs > 0:
            return max(1, math.ceil(self.epochs * n_pool / self.unlabeled_batch))
        return self.steps

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(bool(self.init.strip()), f"--init is empty; pass {DEFAULT_ENCODER}, another encoder URI, or random")
        need(self.arch in ENCODERS, f"--arch {self.arch}: unknown encoder; choose one of {', '.join(ENCODERS)}")
        need(1 <= self.width <= 512, f"--width {self.width}: must be between 1 and 512")
        need(1 <= self.steps <= 10_000_000, f"--steps {self.steps}: must be between 1 and 10000000")
        need(0 <= self.epochs <= 10000, f"--epochs {self.epochs}: must be between 0 (use --steps) and 10000")
        need(2 <= self.batch_size <= 4096, f"--batch-size {self.batch_size}: must be between 2 and 4096")
        need(1 <= self.mu <= 64, f"--mu {self.mu}: must be between 1 and 64 (unlabeled images per labeled one)")
        need(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        need(math.isfinite(self.lr) and 0 < self.lr <= 10, f"--lr {self.lr}: must be a positive number up to 10")
        need(0 <= self.weight_decay <= 1, f"--weight-decay {self.weight_decay}: must be between 0 and 1")
        need(0 < self.encoder_lr_ratio <= 10, f"--encoder-lr-ratio {self.encoder_lr_ratio}: must be in (0, 10]")
        need(0 < self.tau <= 1, f"--tau {self.tau}: must be in (0, 1] (a confidence threshold; 0.95 is usual)")
        need(0 <= self.lambda_u <= 100, f"--lambda-u {self.lambda_u}: must be between 0 and 100")
        need(self.threshold in THRESHOLDS, f"--threshold {self.threshold}: choose one of {', '.join(THRESHOLDS)}")
        need(self.targets in TARGET_MODELS, f"--targets {self.targets}: choose one of {', '.join(TARGET_MODELS)}")
        need(0 <= self.ema < 1, f"--ema {self.ema}: must be in [0, 1) (0 turns the EMA model off; 0.999 is usual)")
        need(self.targets != "ema" or self.ema > 0, "--targets ema: needs an EMA model; set --ema above 0 (e.g. 0.999)")
        need(self.strong in STRONG_PRESETS, f"--strong {self.strong}: choose one of {', '.join(STRONG_PRESETS)}")
        need(0 <= self.strong_strength <= 3, f"--strong-strength {self.strong_strength}: must be between 0 and 3")
        need(0 <= self.bar <= 1, f"--bar {self.bar}: must be between 0 and 1 (a share of the views)")
        need(0 <= self.weak_strength <= 3, f"--weak-strength {self.weak_strength}: must be between 0 and 3")
        need(self.eval_every >= 1, f"--eval-every {self.eval_every}: must be >= 1 step")
        need(0 <= self.tta_views <= 64, f"--tta-views {self.tta_views}: must be between 0 (off) and 64")
        check_precision(self.precision)

    def strong_spec(self) -> aug.ViewSpec:
        return replace(STRONG_PRESETS[self.strong].scaled(self.strong_strength), bar_probability=self.bar)

    def weak_spec(self) -> aug.AffineSpec:
        return WEAK_SPEC.scaled(self.weak_strength)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "progress"}

    # settings a resumed run must share with its checkpoint (the rest may change)
    RESUME_KEYS = (
        "init", "arch", "width", "steps", "epochs", "batch_size", "mu", "optimizer", "lr", "weight_decay",
        "encoder_lr_ratio", "tau", "lambda_u", "threshold", "dist_align", "targets", "ema", "strong",
        "strong_strength", "weak_strength", "bar", "head_warmup", "eval_every", "seed", "labels_per_class", "n_labels",
        "precision",
    )  # fmt: skip


# ---------------------------------------------------------------- data


@dataclass
class SemisupData:
    """Labeled images ([0, 1]), the unlabeled pool (uint8) and, for monitoring only, its labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    pool: torch.Tensor  # (N, 28, 28) uint8, the unlabeled images
    pool_idx: torch.Tensor  # their indices into the MNIST training set
    pool_labels: torch.Tensor | None = None  # monitoring only: never reaches the loss
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


def semisup_data(mnist: MNIST, draw: LabeledDraw, device: torch.device | str, with_test: bool = True) -> SemisupData:
    """The draw's 75/25 labeled split and its unlabeled pool; refuses a pool that overlaps the labels."""
    labeled = set(draw.labeled_idx.tolist())
    if labeled & set(draw.unlabeled_idx.tolist()):
        raise RuntimeError("the unlabeled pool contains labeled images; the draw is inconsistent")
    has_test = with_test and mnist.test_images.shape[0] > 0
    return SemisupData(
        x_train=to_unit(mnist.train_images[draw.train_idx], device),
        y_train=mnist.train_labels[draw.train_idx].to(device),
        x_val=to_unit(mnist.train_images[draw.val_idx], device),
        y_val=mnist.train_labels[draw.val_idx].to(device),
        pool=mnist.train_images[draw.unlabeled_idx].to(device),
        pool_idx=draw.unlabeled_idx.clone(),
        pool_labels=mnist.train_labels[draw.unlabeled_idx].to(device),
        x_test=to_unit(mnist.test_images, device) if has_test else None,
        y_test=mnist.test_labels.to(device) if has_test else None,
    )


# ---------------------------------------------------------------- pseudo-labels


@dataclass
class PseudoLabels:
    probs: torch.Tensor  # (N, C) class probabilities after alignment
    confidence: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,) hard labels
    mask: torch.Tensor  # (N,) 1.0 where the target counts, else 0.0


@torch.no_grad()
def pseudo_labels(
    weak_logits: torch.Tensor, thresholds: float | torch.Tensor, align: torch.Tensor | None = None
) -> PseudoLabels:
    """Hard targets from weak-view logits: softmax, optional alignment factors (C,), argmax, and a
    mask where the confidence reaches the threshold (a number, or one per predicted class)."""
    probs = F.softmax(weak_logits.detach().float(), dim=1)
    if align is not None:
        probs = probs * align.view(1, -1)
        probs = probs / probs.sum(dim=1, keepdim=True)
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
        result = pseudo_labels(weak_logits, thresholds, align)
        if self.memory is not None:
            over = result.confidence > self.tau
            self.memory[pool_positions[over]] = result.targets[over].to(torch.int16)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"p_model": self.p_model.cpu().clone(), "memory": None if self.memory is None else self.memory.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_model.copy_(state["p_model"])
        if self.memory is not None:
            self.memory.copy_(state["memory"])


# ---------------------------------------------------------------- the EMA model


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


# ---------------------------------------------------------------- one step's loss


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


# ---------------------------------------------------------------- model, head warm-up, optimizer


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
    from fewshot.probe import FeatureSet, encode, train_linear_head
    from fewshot.train import FitConfig

    encoder = model.encoder
    was_training = encoder.training
    train_f, val_f = encode(encoder, data.x_train), encode(encoder, data.x_val)
    encoder.train(was_training)
    features = FeatureSet(train_f, data.y_train, val_f, data.y_val, test=train_f[:0], y_test=data.y_train[:0])
    fit_cfg = FitConfig(epochs=300, lr=3e-3, batch_size=train_f.shape[0], progress=False)
    generator = torch.Generator(train_f.device).manual_seed(seed)
    head, _ = train_linear_head(features, fit_cfg, standardize=False, generator=generator)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)


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


def fixmatch_lr(base: float, step: int, total: int) -> float:
    """FixMatch's schedule: ``base * cos(7 pi step / (16 total))`` (ends at about 0.2 base)."""
    return base * math.cos(7 * math.pi * step / (16 * max(1, total)))


# ---------------------------------------------------------------- monitoring


class Monitor:
    """Running sums over one evaluation window: losses, mask rate and, from the pool's true labels
    (never used for training), pseudo-label accuracy and a (true, pseudo-label) confusion matrix."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(6, device=self.device)  # sup, unsup, masked, seen, correct masked, correct all
        self.steps = 0
        self.confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def add(self, out: StepOutput, true_labels: torch.Tensor | None) -> None:
        p = out.pseudo
        self.sums[0] += out.sup_loss.float()
        self.sums[1] += out.unsup_loss.float()
        self.sums[2] += p.mask.sum()
        self.sums[3] += p.mask.numel()
        if true_labels is not None:
            hit = (p.targets == true_labels).float()
            self.sums[4] += (hit * p.mask).sum()
            self.sums[5] += hit.sum()
            chosen = p.mask.bool()
            flat = true_labels[chosen] * NUM_CLASSES + p.targets[chosen]
            self.confusion += torch.bincount(flat, minlength=NUM_CLASSES * NUM_CLASSES)
        self.steps += 1

    def metrics(self, with_labels: bool) -> Metrics:
        sup, unsup, masked, seen, correct_masked, correct_all = self.sums.tolist()
        steps = max(self.steps, 1)
        out = {"sup_loss": sup / steps, "unsup_loss": unsup / steps, "mask_rate": masked / max(seen, 1)}
        if with_labels:
            out["pseudo_acc"] = correct_masked / masked if masked else float("nan")
            out["pseudo_acc_all"] = correct_all / max(seen, 1)
        return out


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision | None = None
) -> tuple[float, float, torch.Tensor]:
    """(top-1, mean cross-entropy, logits) of ``model`` in eval mode (its forward under ``precision``)."""
    was_training = model.training
    with precision_context(precision):
        logits = predict_logits(model, x)
    model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y)), logits


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    save_atomic(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a semi-supervised checkpoint; one-line UserError when missing or corrupt."""
    return load_checked(
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
        ("model_spec", "model", "optimizer", "labeler", "generator", "step", "history", "config"),
        "semi-supervised",
    )  # fmt: skip


def check_resume_config(cfg: SemisupConfig, state: dict[str, Any]) -> None:
    check_same_settings(state["config"], cfg, SemisupConfig.RESUME_KEYS)


# ---------------------------------------------------------------- the loop


@dataclass
class SemisupResult:
    model: EncoderClassifier  # the evaluated model (the EMA model when --ema > 0), eval mode
    online: EncoderClassifier
    history: list[Metrics] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    pseudo_confusion: torch.Tensor | None = None  # last window's (true, pseudo-label) counts, monitoring only


def _pool_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The pool's order in one pass: a function of (seed, epoch) only, so a resume needs no stored order."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63))
    return torch.randperm(n, generator=generator).to(device)


def train_semisup(
    cfg: SemisupConfig,
    data: SemisupData,
    model: EncoderClassifier,
    on_eval: EvalCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    resume_state: dict[str, Any] | None = None,
) -> SemisupResult:
    """Train ``model`` (built by ``build_model``, head warmed up or not) on ``data``.

    Every ``cfg.eval_every`` steps (and at the end) the evaluated model (EMA if any) is scored on
    the validation split (and the test set when present and ``cfg.eval_test``), the window's
    monitor metrics are added, ``on_eval(step, metrics)`` runs (whatever it raises propagates),
    and then, with ``checkpoint_path``, the full state is written atomically. ``resume_state``
    (from ``load_checkpoint``) continues such a state and reproduces the uninterrupted run.
    """
    cfg.validate()
    device = data.x_train.device
    cuda = device.type == "cuda"
    precision = Precision.choose(cfg.precision, device)
    n_pool, n_labeled = data.pool.shape[0], data.x_train.shape[0]
    unlabeled_batch = cfg.unlabeled_batch
    if n_pool < unlabeled_batch:
        raise UserError(
            f"--batch-size {cfg.batch_size} x --mu {cfg.mu} = {unlabeled_batch}: more than the unlabeled pool ({n_pool})"
        )
    steps_per_pass = n_pool // unlabeled_batch
    total = cfg.total_steps(n_pool)
    counts = torch.bincount(data.y_train, minlength=NUM_CLASSES).float()
    p_target = (counts + 1) / (counts + 1).sum()  # the labeled frequencies, smoothed (uniform for a balanced draw)
    labeler = PseudoLabeler(cfg, p_target, n_pool, device)
    optimizer = make_optimizer(cfg, model)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    weak, strong = cfg.weak_spec(), cfg.strong_spec()
    monitor = Monitor(device)
    with_labels = data.pool_labels is not None

    step, history, seconds = 0, [], 0.0
    if resume_state is not None:
        check_resume_config(cfg, resume_state)
        model.load_state_dict(resume_state["model"])
        if ema is not None:
            ema.model.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        labeler.load_state_dict(resume_state["labeler"])
        generator.set_state(resume_state["generator"])
        step, history = resume_state["step"], list(resume_state["history"])
        seconds = resume_state.get("train_seconds", 0.0)

    def evaluated() -> EncoderClassifier:
        return ema.model if ema is not None else model

    def checkpoint() -> None:
        if checkpoint_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_spec": model_spec(model),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema": {k: v.detach().cpu() for k, v in ema.model.state_dict().items()} if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "labeler": labeler.state_dict(),
            "generator": generator.get_state().cpu(),
            "step": step,
            "finished": step >= total,
            "history": history,
            "train_seconds": seconds,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.params().items()},
            **(checkpoint_extra or {}),
        }
        save_checkpoint(state, checkpoint_path)

    model.train()
    order, order_epoch = None, -1
    last_confusion: torch.Tensor | None = None
    progress_bar = tqdm(total=total, initial=step, desc="semisup", disable=not cfg.progress, dynamic_ncols=True)
    window_start = time.perf_counter()
    window_steps = 0
    # Ctrl-C / SIGTERM: finish the step, write a checkpoint, then stop
    with StopAtStepBoundary() as stop:
        while step < total:
            epoch, i = divmod(step, steps_per_pass)
            if epoch != order_epoch:
                order, order_epoch = _pool_order(cfg.seed, epoch, n_pool, device), epoch
            positions = order[i * unlabeled_batch : (i + 1) * unlabeled_batch]
            labeled = torch.randint(n_labeled, (cfg.batch_size,), generator=generator, device=device)
            x_l = data.x_train[labeled]
            if cfg.bar > 0:
                x_l = aug.crossbar(x_l, cfg.bar, generator)
            x_l = aug.random_affine(x_l, weak, generator)
            u = to_unit(data.pool[positions])
            u_weak = aug.random_affine(u, weak, generator)
            u_strong = aug.random_view(u, strong, generator)
            lr = fixmatch_lr(cfg.lr, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]
            teacher = ema.model if (ema is not None and cfg.targets == "ema") else model
            with precision.autocast():  # losses, pseudo-labels and the EMA stay fp32
                out = consistency_loss(
                    model, teacher, x_l, data.y_train[labeled], u_weak, u_strong, positions, labeler, cfg.lambda_u
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            window_steps += 1
            if ema is not None:
                ema.update(model, step)
            monitor.add(out, data.pool_labels[positions] if with_labels else None)
            progress_bar.update(1)
            if step % cfg.eval_every == 0 or step == total:
                if cuda:
                    torch.cuda.synchronize(device)
                window_seconds = time.perf_counter() - window_start
                seconds += window_seconds
                metrics = monitor.metrics(with_labels)
                if not (math.isfinite(metrics["sup_loss"]) and math.isfinite(metrics["unsup_loss"])):
                    raise TrainingDiverged(
                        f"semi-supervised training diverged by step {step} (loss {metrics['sup_loss']} + "
                        f"{metrics['unsup_loss']}); lower --lr (now {cfg.lr})"
                    )
                scored = evaluated()
                metrics["val_acc"], metrics["val_loss"], _ = evaluate_model(scored, data.x_val, data.y_val, precision)
                if cfg.eval_test and data.x_test is not None:
                    metrics["test_acc"], _, _ = evaluate_model(scored, data.x_test, data.y_test, precision)
                thresholds = labeler.thresholds()
                if isinstance(thresholds, torch.Tensor):
                    metrics["threshold_min"] = float(thresholds.min())
                    metrics["threshold_mean"] = float(thresholds.mean())
                if cfg.dist_align:
                    metrics["p_model_max"] = float(labeler.p_model.max())
                    metrics["p_model_min"] = float(labeler.p_model.min())
                metrics.update(
                    lr=lr, step=step, unlabeled_per_s=window_steps * unlabeled_batch / max(window_seconds, 1e-9),
                    train_seconds=seconds,
                )  # fmt: skip
                history.append(metrics)
                last_confusion = monitor.confusion.view(NUM_CLASSES, NUM_CLASSES).cpu().clone()
                monitor.reset()
                shown = {"val": f"{metrics['val_acc']:.3f}", "mask": f"{metrics['mask_rate']:.2f}"}
                if "test_acc" in metrics:
                    shown["test"] = f"{metrics['test_acc']:.4f}"
                progress_bar.set_postfix(shown)
                if on_eval is not None:
                    on_eval(step, metrics)
                checkpoint()
                window_start = time.perf_counter()
                window_steps = 0
            elif stop.requested is not None:  # the window's monitor metrics restart on resume; training does not
                seconds += time.perf_counter() - window_start
                checkpoint()
            stop.raise_if_requested()
    progress_bar.close()
    model.eval()
    final = evaluated().eval()
    return SemisupResult(final, model, history, step, seconds, last_confusion if with_labels else None)


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


def prepare_model(cfg: SemisupConfig, data: SemisupData, encoder: nn.Module | None) -> EncoderClassifier:
    """``build_model`` then, with ``cfg.head_warmup``, the linear-probe head."""
    model = build_model(cfg, encoder, data.x_train.device)
    if cfg.head_warmup and encoder is not None:  # random features have nothing to probe
        warm_start_head(model, data, cfg.seed)
    return model


# ---------------------------------------------------------------- the probe (fewshot.probe's registry)


def semisup_probe(ctx) -> Any:
    """``linear_eval --probe semisup``: this method with its defaults, ``--epochs`` read as steps,
    starting from the probe's encoder (a copy; the loaded one is left untouched)."""
    from fewshot.probe import ProbeResult

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
    result = train_semisup(cfg, data, model)
    classifier = result.model
    val_scores = predict_logits(classifier, data.x_val)
    test_scores = predict_logits(classifier, ctx.images.x_test)
    seconds = time.perf_counter() - started
    return ProbeResult(classifier, classifier.head, val_scores, test_scores, None, seconds, frozen=False)


# ---------------------------------------------------------------- figures


def curves_figure(history: list[Metrics], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_acc, ax_pl, ax_loss) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("val_acc", "validation top-1 (25)"), ("test_acc", "test top-1 (monitor)")):
        if all(key in h for h in history):
            ax_acc.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax_acc.set_ylabel("accuracy")
    for key, label in (("mask_rate", "mask rate"), ("pseudo_acc", "pseudo-label accuracy (masked)"),
                       ("pseudo_acc_all", "weak-view accuracy (all)")):  # fmt: skip
        if all(key in h for h in history):
            ax_pl.plot(steps, [h[key] for h in history], marker=".", label=label)
    ax_pl.set_ylabel("share")
    ax_loss.plot(steps, [h["sup_loss"] for h in history], label="labeled CE")
    ax_loss.plot(steps, [h["unsup_loss"] for h in history], label="unlabeled CE (masked)")
    ax_loss.set_ylabel("loss")
    for ax in (ax_acc, ax_pl, ax_loss):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def views_figure(data: SemisupData, cfg: SemisupConfig):
    from fewshot import plots

    x = to_unit(data.pool[:8].cpu())
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = [x] + [aug.random_affine(x, cfg.weak_spec(), generator) for _ in range(2)]
    rows += [aug.random_view(x, cfg.strong_spec(), generator) for _ in range(3)]
    names = ["original", "weak #1", "weak #2", "strong #1", "strong #2", "strong #3"]
    return plots.image_grid_figure(rows, names, f"weak and strong views (strong={cfg.strong})")


# ---------------------------------------------------------------- the MLflow job

RESUME_CHOICES = ("auto", "never")


def init_tag(cfg: SemisupConfig) -> str:
    return RANDOM_INIT if cfg.random_init else "moco"


def default_run_name(cfg: SemisupConfig) -> str:
    return f"semisup-{init_tag(cfg)}-seed{cfg.seed}"


def checkpoint_file(checkpoint_dir: str | Path | None, run_name: str) -> Path:
    return Path(checkpoint_dir or "checkpoints/semisup") / run_name / "last.pt"


def run_semisup(
    cfg: SemisupConfig,
    checkpoint_dir: str | Path | None = None,
    run_name: str | None = None,
    resume: str = "auto",
    register: bool = True,
    on_eval: EvalCallback | None = None,
) -> dict[str, Any]:
    """Train on one label draw in an MLflow run, log everything, register the classifier.

    ``resume``: ``auto`` (continue this run name's unfinished checkpoint, in the same MLflow
    run), ``never``, or a checkpoint path. With ``register`` the classifier becomes a version of
    ``fewshot-classifier``, champion when its validation top-1 beats the champion's.
    """
    from fewshot import plots, tracking
    from fewshot.data import draw_labels, load_mnist
    from fewshot.device import configure_threads
    from fewshot.encoder_source import resolve_encoder
    from fewshot.evaluate import confusion_matrix, topk_accuracy

    cfg.validate()
    configure_threads()
    device = pick_device(cfg.device)
    run_name = run_name or default_run_name(cfg)
    path = checkpoint_file(checkpoint_dir, run_name)
    state = resolve_resume(resume, path, load_checkpoint)
    if state is not None:
        check_resume_config(cfg, state)
        if resume not in RESUME_CHOICES:
            path = Path(resume)
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    source_params: dict[str, Any] = {}
    source_tags: dict[str, Any] = {}
    encoder = None
    if state is not None:  # the checkpoint holds every weight; the init's provenance is in the run already
        spec = state["model_spec"]
        encoder = build_encoder(spec["arch"], int(spec["width"]))
    elif not cfg.random_init:  # before the run: a bad URI leaves no run behind
        encoder, source = resolve_encoder(cfg.init, option="--init")
        source_params, source_tags = source.params(), source.tags()
    run_id = state.get("mlflow_run_id") if state else None
    if run_id is not None:
        tracking.configure()
        if not tracking.run_exists(run_id):
            raise UserError(f"--resume: the checkpoint's MLflow run {run_id} is not in this tracking store; "
                            "point MLFLOW_TRACKING_URI at the store it came from or pass --resume never")  # fmt: skip
    data = semisup_data(mnist, draw, device)
    tags = {"job": "semisup", "init": init_tag(cfg), "seed": cfg.seed, **source_tags}
    started = time.perf_counter()
    with tracking.start_run(run_name=run_name, run_id=run_id, tags=tags) as tracker:
        already = tracking.logged_steps(tracker.run_id, "val_acc") if run_id else set()
        model = prepare_model(replace(cfg, head_warmup=cfg.head_warmup and state is None), data, encoder)
        arch, width = encoder_arch(model.encoder)
        if state is None:
            tracker.log_params({
                **cfg.params(), **source_params, "device": str(device), "model_arch": arch, "model_width": width,
                "precision_resolved": Precision.choose(cfg.precision, device).name,
                "n_unlabeled": len(draw.unlabeled_idx), "total_steps": cfg.total_steps(len(draw.unlabeled_idx)),
                "unlabeled_batch": cfg.unlabeled_batch, "checkpoint": str(path.resolve()),
            })  # fmt: skip
            tracker.log_draw(draw, mnist.source)
            tracker.log_figure(views_figure(data, cfg), "augmentation/views.png")
            if cfg.head_warmup and not cfg.random_init:
                head_val, _, _ = evaluate_model(model, data.x_val, data.y_val)
                tracker.log_metrics({"warmup_head_val_top1": head_val})
        else:
            tracker.set_tags({"resumed_from_step": state["step"]})
            # evaluations whose logging was lost
            tracker.log_new_steps(((int(m["step"]), m) for m in state["history"]), already)

        result = train_semisup(
            cfg, data, model, on_eval=tracker.new_step_logger(already, on_eval), checkpoint_path=path,
            checkpoint_extra={"mlflow_run_id": tracker.run_id}, resume_state=state,
        )  # fmt: skip
        classifier = result.model
        title = f"semi-supervised ({init_tag(cfg)} init), seed {cfg.seed}"
        val_logits = predict_logits(classifier, data.x_val)
        test_logits, plain_logits = final_test_scores(classifier, data.x_test, cfg)
        single_view: dict[str, float] = {}  # with TTA, the classifier's own single-view figure beside
        if cfg.tta_views:
            single_view["test_plain_top1"] = topk_accuracy(plain_logits, data.y_test)[1]
        val_topk = topk_accuracy(val_logits, data.y_val)
        test_topk = topk_accuracy(test_logits, data.y_test)
        tracker.log_evaluation("val", val_topk, confusion_matrix(data.y_val.cpu(), val_logits.argmax(1).cpu()),
                               f"{title}: validation confusion")  # fmt: skip
        tracker.log_evaluation("test", test_topk, confusion_matrix(data.y_test.cpu(), test_logits.argmax(1).cpu()),
                               f"{title}: test confusion")  # fmt: skip
        if result.history:
            tracker.log_figure(curves_figure(result.history, title), "evaluation/learning_curves.png")
        if result.pseudo_confusion is not None:
            tracker.log_figure(
                plots.confusion_figure(result.pseudo_confusion, f"{title}: confident pseudo-labels, last window"),
                "evaluation/pseudo_label_confusion.png",
            )
        final = result.history[-1] if result.history else {}
        summary = {
            "train_seconds": result.train_seconds,
            # training time of earlier sessions (from the checkpoint) plus all of this one
            "wall_seconds": (state or {}).get("train_seconds", 0.0) + time.perf_counter() - started,
            "final_mask_rate": final.get("mask_rate", float("nan")),
            **single_view,
        }
        if "pseudo_acc" in final:
            summary["final_pseudo_acc"] = final["pseudo_acc"]
        tracker.log_metrics(summary)
        tracker.log_checkpoint(path)
        spec = model_spec(classifier)
        model_uri = tracker.log_torch_model(classifier, "classifier", spec)
        out: dict[str, Any] = {
            "run_id": tracker.run_id, "model_uri": model_uri, "checkpoint": str(path), "val_top1": val_topk[1],
            **{f"test_top{k}": v for k, v in test_topk.items()}, **summary,
        }  # fmt: skip
        if register:
            version, alias = tracking.register_model_version(
                model_uri, REGISTERED_MODEL, val_topk[1],
                {"job": "semisup", "init": init_tag(cfg), "seed": cfg.seed, "run_id": tracker.run_id,
                 "test_top1": f"{test_topk[1]:.6f}", "test_score": "report-only (never used to pick the champion)"},
            )  # fmt: skip
            tracker.set_tags({"registered_version": version, "registered_alias": alias})
            out.update(version=version, alias=alias)
    return out
