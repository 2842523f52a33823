"""What a search tunes: a search space, an objective on labeled training data, and the winner's report.

A target sees ``SearchData``, which holds MNIST *without its test set* (the tensors are
emptied before any trial starts), so neither the objective nor the sampler nor the pruner
can read a test image. ``report_winner`` gets the full MNIST after the search, for the
winner only; its numbers are logged as report-only.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
import torch
from torch import nn

from fewshot.augment import AffineSpec, OnlineAffine
from fewshot.data import MNIST, LabeledDraw, labeled_tensors
from fewshot.device import Precision, place
from fewshot.encoder_source import resolve_encoder
from fewshot.evaluate import evaluate_split, topk_accuracy
from fewshot.hpo.config import Budget, HpoConfig
from fewshot.hpo.folds import LabeledSet, Split, make_splits
from fewshot.linear_head import FeatureSet, cached_features, encode, train_linear_head
from fewshot.models import build_classifier, with_feature_grid
from fewshot.pretrain import PretrainConfig, pretrain, selection_score
from fewshot.probe import DEFAULT_FEATURE_GRID, default_feature_maps
from fewshot.semisup import RANDOM_INIT, SemisupConfig, SemisupData, prepare_model, train_semisup
from fewshot.train import FitConfig, evaluate_loss, fit

Report = Callable[[int, float], None]  # (step, intermediate value): records it, raises TrialPruned to stop
StepLogger = Callable[[dict[str, float], int], None]  # per-epoch metrics of the trial's own run
_INIT_LOCK = threading.Lock()  # model init reads torch's global RNG: one trial thread at a time


def without_test_set(mnist: MNIST) -> MNIST:
    """The same MNIST with empty test tensors: what every trial gets."""
    return dataclasses.replace(mnist, test_images=mnist.test_images[:0], test_labels=mnist.test_labels[:0])


@dataclass(frozen=True)
class SearchData:
    mnist: MNIST  # test set emptied
    draw: LabeledDraw
    labeled: LabeledSet
    splits: list[Split]
    device: torch.device
    seed: int
    budget: Budget


@dataclass
class Outcome:
    value: float
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    model: nn.Module | None = None  # logged on the trial's run (the MoCo encoder)
    model_spec: dict[str, Any] | None = None


@dataclass
class WinnerReport:
    metrics: dict[str, float]  # test_top1 ... (report-only)
    val_measure: str


class Target(Protocol):
    name: str
    measure: str  # what the objective value is, e.g. "cv5_accuracy"

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...

    def evaluate(self, params: dict[str, Any], report: Report, log_step: StepLogger) -> Outcome: ...

    def report_winner(self, params: dict[str, Any], trial: optuna.trial.FrozenTrial, mnist: MNIST) -> WinnerReport: ...


def _measure(folds: int) -> str:
    return f"cv{folds}_accuracy" if folds else "val_accuracy"


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).float().mean())


def _cross_validate(data: SearchData, score_split: Callable[[int, Split], float], report: Report,
                    log_step: StepLogger) -> Outcome:  # fmt: skip
    """Mean score over the splits; the running mean is reported after each fold (pruning point)."""
    scores = []
    for i, split in enumerate(data.splits):
        scores.append(score_split(i, split))
        running = sum(scores) / len(scores)
        log_step({"fold_accuracy": scores[-1], "running_mean_accuracy": running}, i)
        report(i, running)
    mean = sum(scores) / len(scores)
    spread = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return Outcome(mean, {"fold_std": spread})


# ---------------------------------------------------------------- linear head on a fixed encoder


class LinearTarget:
    """The report's space (optimizer, lr, batch size) widened with weight decay, epochs and
    standardisation; features of the labeled images are computed once per process."""

    name = "linear"
    OPTIMIZERS = ("adam", "adamw", "sgd", "adadelta", "adagrad")

    def __init__(self, cfg: HpoConfig, data: SearchData) -> None:
        self.data = data
        self.folds = cfg.folds
        self.measure = _measure(cfg.folds)
        self.encoder, self.source = resolve_encoder(cfg.encoder)
        maps = default_feature_maps("linear", self.source.arch)  # linear_eval's read-out
        self.encoder = place(with_feature_grid(self.encoder, DEFAULT_FEATURE_GRID, maps), data.device).eval()
        started = time.perf_counter()
        self.features = encode(self.encoder, data.labeled.x)  # the labeled images only, once
        self.feature_seconds = time.perf_counter() - started

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        max_epochs = self.data.budget.epochs or 100
        return {
            "optimizer": trial.suggest_categorical("optimizer", list(self.OPTIMIZERS)),
            "lr": trial.suggest_float("lr", 1e-4, 1.0, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [10, 20, 40]),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "epochs": trial.suggest_int("epochs", min(10, max_epochs), max_epochs, log=True),
            "standardize": trial.suggest_categorical("standardize", [True, False]),
        }

    @staticmethod
    def fit_config(params: dict[str, Any]) -> FitConfig:
        return FitConfig(
            optimizer=params["optimizer"], lr=params["lr"], weight_decay=params["weight_decay"],
            batch_size=params["batch_size"], epochs=params["epochs"], schedule="cosine", progress=False,
        )  # fmt: skip

    def _head(self, params: dict[str, Any], train_f, train_y, val_f, val_y, seed: int) -> nn.Module:
        empty = train_f[:0]
        features = FeatureSet(train_f, train_y, val_f, val_y, test=empty, y_test=train_y[:0])
        generator = torch.Generator(self.data.device).manual_seed(seed)
        head, _ = train_linear_head(features, self.fit_config(params), params["standardize"], generator, normalize=True)
        return head

    def evaluate(self, params: dict[str, Any], report: Report, log_step: StepLogger) -> Outcome:
        f, y = self.features, self.data.labeled.y

        def score(i: int, split: Split) -> float:
            head = self._head(params, f[split.train], y[split.train], f[split.val], y[split.val], self.data.seed + i)
            with torch.no_grad():
                return _accuracy(head(f[split.val]), y[split.val])

        return _cross_validate(self.data, score, report, log_step)

    def report_winner(self, params: dict[str, Any], trial: optuna.trial.FrozenTrial, mnist: MNIST) -> WinnerReport:
        """The winning head trained on the draw's 75/25 split, scored on the test set."""
        features = cached_features(self.encoder, mnist, self.data.draw, self.data.device)
        head = self._head(params, features.train, features.y_train, features.val, features.y_val, self.data.seed)
        with torch.no_grad():
            test = topk_accuracy(head(features.test), features.y_test)
            val = _accuracy(head(features.val), features.y_val)
        return WinnerReport({"test_top1": test[1], "test_top5": test[5], "winner_val_top1": val}, self.measure)


class TrainedClassifierTarget:
    """A target whose trial trains a whole classifier (``_train``): the objective is the mean
    validation top-1 over the folds; the winner is retrained on the 75/25 split for the report."""

    data: SearchData
    measure: str

    def _train(self, params: dict[str, Any], train, val, seed: int) -> nn.Module:
        raise NotImplementedError

    def evaluate(self, params: dict[str, Any], report: Report, log_step: StepLogger) -> Outcome:
        x, y = self.data.labeled.x, self.data.labeled.y

        def score(i: int, split: Split) -> float:
            model = self._train(params, (x[split.train], y[split.train]), (x[split.val], y[split.val]),
                                self.data.seed + i)  # fmt: skip
            return evaluate_loss(model, x[split.val], y[split.val])[1]

        return _cross_validate(self.data, score, report, log_step)

    def report_winner(self, params: dict[str, Any], trial: optuna.trial.FrozenTrial, mnist: MNIST) -> WinnerReport:
        t = labeled_tensors(mnist, self.data.draw, self.data.device)
        model = self._train(params, (t.x_train, t.y_train), (t.x_val, t.y_val), self.data.seed)
        test, _ = evaluate_split(model, t.x_test, t.y_test)
        val, _ = evaluate_split(model, t.x_val, t.y_val)
        return WinnerReport({"test_top1": test[1], "test_top5": test[5], "winner_val_top1": val[1]}, self.measure)


# ---------------------------------------------------------------- the supervised CNN


class BaselineTarget(TrainedClassifierTarget):
    """The report's CNN: lr, weight decay and augmentation strength; epochs per fold = budget."""

    name = "baseline"

    def __init__(self, cfg: HpoConfig, data: SearchData) -> None:
        self.data = data
        self.measure = _measure(cfg.folds)
        self.precision = Precision.choose(cfg.precision, data.device)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "lr": trial.suggest_float("lr", 3e-4, 3e-2, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True),
            "augment_strength": trial.suggest_float("augment_strength", 0.0, 2.0),
        }

    def _train(self, params: dict[str, Any], train, val, seed: int) -> nn.Module:
        with _INIT_LOCK:
            torch.manual_seed(seed)
            model = place(build_classifier("cnn"), self.data.device)
        cfg = FitConfig(optimizer="adamw", lr=params["lr"], weight_decay=params["weight_decay"], batch_size=75,
                        epochs=self.data.budget.epochs or 150, progress=False)  # fmt: skip
        strength = params["augment_strength"]
        augment = OnlineAffine(AffineSpec().scaled(strength)) if strength > 0 else None
        fit(model, train, val, cfg, torch.Generator(self.data.device).manual_seed(seed), augment=augment,
            precision=self.precision)  # fmt: skip
        return model


# ---------------------------------------------------------------- MoCo pretraining


class MocoTarget:
    """MoCo's lr, temperature, momentum, queue size, augmentation strength and width.

    The kNN validation accuracy (bank: the 75 train labels, queries: the 25 validation
    labels) is reported after every epoch for pruning. The objective value is the registry's
    measure, leave-one-out kNN accuracy over the 100 labeled images (``selection_score``), so a
    winner can be compared with encoders registered by ``moco_pretrain``. ``--folds`` does not
    apply here. A budget in minutes is turned into steps per trial from a 3-step timing.
    """

    name = "moco"
    measure = "loo_knn_accuracy"
    REPORTS = 4  # epochs (pruning points) a minutes budget is split into

    def __init__(self, cfg: HpoConfig, data: SearchData) -> None:
        self.data = data
        base = {"seed": cfg.seed, "device": str(data.device), "progress": False, "knn_test": False,
                "checkpoint_minutes": 0.0, "labels_per_class": cfg.labels_per_class, "n_labels": cfg.n_labels,
                "precision": cfg.precision}  # fmt: skip
        self.base = {**base, **cfg.moco_overrides}
        PretrainConfig(**self.base).validate()

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        batch = self.base.get("batch_size", 256)
        queues = [k for k in (1024, 2048, 4096, 8192) if k >= batch] or [batch]
        return {
            "lr": trial.suggest_float("lr", 0.01, 0.3, log=True),
            "moco_t": trial.suggest_float("moco_t", 0.05, 0.5, log=True),
            "moco_m": trial.suggest_categorical("moco_m", [0.99, 0.995, 0.999]),
            "moco_k": trial.suggest_categorical("moco_k", queues),
            "augment_strength": trial.suggest_float("augment_strength", 0.5, 1.5),
            "width": trial.suggest_categorical("width", [16, 32, 48]),
        }

    def _config(self, params: dict[str, Any]):
        cfg = PretrainConfig(**{**self.base, **params})
        if self.data.budget.epochs is not None:
            cfg.epochs = self.data.budget.epochs
            return cfg
        return self._fit_minutes(cfg)

    def _fit_minutes(self, cfg):
        """Epochs and steps per epoch that make this trial's pretraining last about the budget."""
        probe = dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=3, warmup_epochs=0)
        started = time.perf_counter()
        pretrain(probe, self.data.mnist, self.data.draw)
        step_seconds = (time.perf_counter() - started) / 3
        steps = max(self.REPORTS, int(self.data.budget.minutes * 60 / step_seconds))
        full_epoch = max(1, len(self.data.draw.unlabeled_idx) // cfg.batch_size)
        if steps >= self.REPORTS * full_epoch:
            return dataclasses.replace(cfg, epochs=steps // full_epoch, max_steps_per_epoch=0)
        return dataclasses.replace(cfg, epochs=self.REPORTS, max_steps_per_epoch=steps // self.REPORTS)

    def _labeled(self):
        return labeled_tensors(self.data.mnist, self.data.draw, self.data.device, with_test=False)

    def evaluate(self, params: dict[str, Any], report: Report, log_step: StepLogger) -> Outcome:
        cfg = self._config(params)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            log_step(metrics, epoch)
            report(epoch, metrics["knn_val_acc"])

        result = pretrain(cfg, self.data.mnist, self.data.draw, on_epoch=on_epoch)
        encoder = place(result.encoder, self.data.device).eval()
        value = selection_score(encoder, self._labeled(), cfg.knn_k, cfg.knn_t)
        spec = {"kind": "encoder", "arch": cfg.arch, "width": cfg.width, "feature_dim": result.encoder.feature_dim}
        metrics = {"epochs": cfg.epochs, "steps": result.steps, "pretrain_seconds": result.wall_seconds}
        if result.history:
            metrics["final_knn_val_acc"] = result.history[-1]["knn_val_acc"]
        return Outcome(value, metrics, model=result.encoder, model_spec=spec)

    def report_winner(self, params: dict[str, Any], trial: optuna.trial.FrozenTrial, mnist: MNIST) -> WinnerReport:
        """The winner's encoder (from its trial run) with a default linear probe, on the test set."""
        encoder, source = resolve_encoder(trial.user_attrs["model_uri"])
        encoder = with_feature_grid(encoder, DEFAULT_FEATURE_GRID, default_feature_maps("linear", source.arch))
        features = cached_features(encoder, mnist, self.data.draw, self.data.device)
        cfg = FitConfig(epochs=300, lr=3e-3, batch_size=75, progress=False)
        generator = torch.Generator(self.data.device).manual_seed(self.data.seed)
        head, _ = train_linear_head(features, cfg, True, generator, normalize=True)
        with torch.no_grad():
            test = topk_accuracy(head(features.test), features.y_test)
            val = _accuracy(head(features.val), features.y_val)
        return WinnerReport({"test_top1": test[1], "test_top5": test[5], "winner_val_top1": val}, self.measure)


# ---------------------------------------------------------------- semi-supervised training


class SemisupTarget(TrainedClassifierTarget):
    """Semi-supervised training (``fewshot.semisup``) from ``--encoder`` (or ``random``): learning
    rate, confidence threshold, unlabeled weight, strong-augmentation strength, per-class
    thresholds and distribution alignment. The budget's epochs are training steps per fold; each
    fold trains on its labeled part plus the unlabeled pool (images only: the pool's labels are
    not handed over) and is scored on its held-out labeled part."""

    name = "semisup"

    def __init__(self, cfg: HpoConfig, data: SearchData) -> None:
        self.data = data
        self.measure = _measure(cfg.folds)
        steps = data.budget.epochs or 300
        base = {"init": cfg.encoder, "seed": cfg.seed, "device": str(data.device), "progress": False,
                "eval_test": False, "steps": steps, "eval_every": steps, "labels_per_class": cfg.labels_per_class,
                "n_labels": cfg.n_labels, "precision": cfg.precision}  # fmt: skip
        # no refit: the held-out fold scores the trial and must stay out of its training
        self.base = {**base, **cfg.semisup_overrides, "refit": False}
        SemisupConfig(**self.base).validate()
        random_init = self.base["init"].strip() == RANDOM_INIT
        self.encoder = None if random_init else resolve_encoder(self.base["init"], option="--encoder")[0]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "lr": trial.suggest_float("lr", 3e-3, 0.1, log=True),
            "tau": trial.suggest_float("tau", 0.8, 0.98),
            "lambda_u": trial.suggest_float("lambda_u", 0.25, 4.0, log=True),
            "strong_strength": trial.suggest_float("strong_strength", 0.5, 1.5),
            "bar": trial.suggest_float("bar", 0.0, 0.6),
            "threshold": trial.suggest_categorical("threshold", ["fixed", "flexmatch"]),
            "dist_align": trial.suggest_categorical("dist_align", [True, False]),
        }

    def _train(self, params: dict[str, Any], train, val, seed: int) -> nn.Module:
        cfg = SemisupConfig(**{**self.base, **params, "seed": seed})
        pool_idx = self.data.draw.unlabeled_idx
        data = SemisupData(*train, *val, pool=self.data.mnist.train_images[pool_idx].to(self.data.device),
                           pool_idx=pool_idx)  # fmt: skip
        with _INIT_LOCK:
            model = prepare_model(cfg, data, self.encoder)
        return train_semisup(cfg, data, model).model


TARGET_CLASSES = {
    "linear": LinearTarget, "moco": MocoTarget, "baseline": BaselineTarget, "semisup": SemisupTarget,
}  # fmt: skip


def make_target(cfg: HpoConfig, mnist: MNIST, draw: LabeledDraw, device: torch.device, budget: Budget) -> Target:
    """The target for ``cfg.target`` over the labeled draw; the test set is removed first."""
    searchable = without_test_set(mnist)
    labeled = LabeledSet.from_draw(searchable, draw, device)
    splits = make_splits(labeled, cfg.folds, cfg.seed)
    data = SearchData(searchable, draw, labeled, splits, device, cfg.seed, budget)
    return TARGET_CLASSES[cfg.target](cfg, data)


def finite(value: float) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)
