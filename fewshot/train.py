"""One supervised fit loop, shared by the baselines and the linear / fine-tune probes."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fewshot.device import Precision, precision_context
from fewshot.errors import TrainingDiverged, UserError

OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta", "adagrad", "lbfgs")
SCHEDULES = ("onecycle", "cosine", "constant")

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EpochCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[dict], None]


@dataclass
class FitConfig:
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 100  # full batch for 75 (and, refitting, 100) labeled images
    epochs: int = 1000
    patience: int = 0  # 0 disables early stopping
    min_delta: float = 0.0
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    progress: bool = True

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer}: unknown optimizer; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule}: choose one of {', '.join(SCHEDULES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: must be a positive number")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs}: must be >= 1")
        if self.patience < 0:
            raise UserError(f"--patience {self.patience}: must be >= 0 (0 turns early stopping off)")
        if self.min_delta < 0:
            raise UserError(f"--min-delta {self.min_delta}: must be >= 0")

    def params(self) -> dict[str, Any]:
        """Every setting but ``progress`` (which changes no result)."""
        return {k: v for k, v in asdict(self).items() if k != "progress"}


def flat_params(config: Any) -> dict[str, Any]:
    """The params of a job config holding a ``fit: FitConfig``: its own fields, then the fit's."""
    return {**{k: v for k, v in asdict(config).items() if k != "fit"}, **config.fit.params()}


class EarlyStopping:
    """Stop when the validation loss has not improved by ``min_delta`` for ``patience``
    epochs in a row; remembers the best weights so the caller can restore them."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record one epoch's validation loss; True when this is the new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss = loss
            self.best_epoch = epoch
            self.bad_epochs = 0
            self.best_state = copy.deepcopy(model.state_dict())
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.best_state = state["best_state"]


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=lr, max_iter=20, history_size=10, line_search_fn="strong_wolfe")
    raise UserError(f"--optimizer {name}: unknown optimizer; choose one of {', '.join(OPTIMIZERS)}")


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if name == "onecycle":
        # one peak per parameter group: groups given their own lr (fine-tuning) keep their ratio
        max_lr = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        # Adadelta, Adagrad and L-BFGS have no momentum for one-cycle to cycle
        cycle_momentum = "momentum" in optimizer.defaults or "betas" in optimizer.defaults
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=max(total_steps, 2), cycle_momentum=cycle_momentum
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@torch.no_grad()
def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return total_loss / x.shape[0], correct / x.shape[0]


def _trainable(params: Iterable) -> list:
    """Parameters that require grad; parameter groups (dicts with their own "lr") pass through, filtered."""
    items = list(params)
    if items and isinstance(items[0], dict):
        return [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in items]
    return [p for p in items if p.requires_grad]


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = math.inf
    stopped_early: bool = False
    epochs_run: int = 0


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    config: FitConfig,
    generator: torch.Generator,
    augment: Augment | None,
    epoch: int,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One shuffled pass over ``train`` (forward passes under ``precision``); returns its mean loss,
    accuracy and the lr after it."""
    x_train, y_train = train
    n = x_train.shape[0]
    model.train()
    order = torch.randperm(n, generator=generator, device=generator.device)
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x_train[idx], y_train[idx]
        if augment is not None:
            xb = augment(xb, generator)

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss_ = F.cross_entropy(model(xb), yb, label_smoothing=config.label_smoothing)
            loss_.backward()
            return loss_

        if config.optimizer == "lbfgs":  # fp32 always: the line search compares losses to 1e-4
            optimizer.step(closure)
            with torch.no_grad():
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
        else:
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                logits = model(xb)
            # fp32 island: the loss from fp32 logits (a no-op cast under fp32)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr (now {config.lr})"
            )
        loss_sum += loss.item() * idx.numel()
        correct += (logits.argmax(1) == yb).sum().item()
    return {"train_loss": loss_sum / n, "train_acc": correct / n, "lr": optimizer.param_groups[0]["lr"]}


def _restore(
    state: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stopper: EarlyStopping,
    generator: torch.Generator,
) -> list[dict[str, float]]:
    """Load a ``fit`` checkpoint's loop state into the live objects; returns its history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper.load_state_dict(state["stopper"])
    generator.set_state(state["generator"])
    return list(state["history"])


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    config: FitConfig,
    generator: torch.Generator,
    augment: Augment | None = None,
    on_epoch: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume_state: dict | None = None,
    params: Iterable[nn.Parameter] | None = None,
    precision: Precision | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` with early stopping on ``val``; restores the best weights.

    With ``val`` None (a final fit on every labeled image) all epochs run and the last
    weights are kept.

    ``generator`` drives shuffling and augmentation, so a seeded generator gives the same
    run twice on the same CPU. ``on_checkpoint`` receives the full loop state after each
    epoch; passing it back as ``resume_state`` continues from there. ``precision`` (None: fp32)
    lowers the training forward passes; the loss, the weights and the validation stay fp32.
    """
    config.validate()
    n = train[0].shape[0]
    batch_size = min(config.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    trainable = _trainable(params if params is not None else model.parameters())
    optimizer = make_optimizer(config.optimizer, trainable, config.lr, config.weight_decay)
    scheduler = make_scheduler(config.schedule, optimizer, config.lr, config.epochs * steps_per_epoch)
    stopper = EarlyStopping(config.patience, config.min_delta)
    result = FitResult()
    start_epoch = 0
    if resume_state is not None:
        result.history = _restore(resume_state, model, optimizer, scheduler, stopper, generator)
        start_epoch = resume_state["epoch"] + 1

    bar = tqdm(range(start_epoch, config.epochs), desc="fit", disable=not config.progress, leave=False)
    for epoch in bar:
        metrics = _train_epoch(model, optimizer, scheduler, train, batch_size, config, generator, augment, epoch,
                               precision)  # fmt: skip
        improved = False
        if val is not None:
            metrics["val_loss"], metrics["val_acc"] = evaluate_loss(model, *val)
            improved = stopper.update(epoch, metrics["val_loss"], model)
        result.history.append(metrics)
        shown = {"loss": f"{metrics['train_loss']:.3f}"}
        if val is not None:
            shown.update(val=f"{metrics['val_loss']:.3f}", best=stopper.best_epoch + 1)
        bar.set_postfix(shown)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if on_checkpoint is not None:
            on_checkpoint(
                copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "stopper": stopper.state_dict(),
                        "generator": generator.get_state(),
                        "history": result.history,
                        "epoch": epoch,
                        "improved": improved,
                    }
                )  # a snapshot: the live tensors keep changing after this epoch
            )
        if stopper.should_stop:
            result.stopped_early = True
            break
    result.epochs_run = len(result.history)
    result.best_epoch = stopper.best_epoch
    result.best_val_loss = stopper.best_loss
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    model.eval()
    return result
