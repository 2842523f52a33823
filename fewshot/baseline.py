"""The supervised baselines on the labeled draw (the report's MLP1, MLP2 and CNN) as one tracked job."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fewshot import augment as aug
from fewshot import plots, tracking
from fewshot.data import LabeledTensors, draw_labels, labeled_tensors, load_mnist
from fewshot.device import Precision, check_precision, configure_threads, pick_device, place, seed_everything
from fewshot.errors import UserError
from fewshot.evaluate import evaluate_split, single_view_metrics
from fewshot.models import CLASSIFIERS, build_classifier
from fewshot.train import FitConfig, fit, flat_params


@dataclass
class BaselineConfig:
    model: str = "cnn"
    augment: str = "online"
    augment_strength: float = 1.0
    refit: bool = True  # after early stopping on the 75/25 split, retrain on all labeled images
    tta_views: int = 8  # test predictions average the image and this many mildly warped copies (0: off)
    seed: int = 0
    data_dir: str | None = None
    labels_per_class: int | None = 10
    n_labels: int | None = None
    run_name: str | None = None
    experiment: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device does bf16 natively, else fp32 (fewshot.device)
    fit: FitConfig = field(default_factory=FitConfig)

    def validate(self) -> None:
        if self.model not in CLASSIFIERS:
            raise UserError(f"--model {self.model}: unknown model; choose one of {', '.join(CLASSIFIERS)}")
        aug.check_augment(self.augment)
        if not 0 <= self.augment_strength <= 3:
            raise UserError(f"--augment-strength {self.augment_strength}: must be between 0 and 3")
        if not 0 <= self.tta_views <= 64:
            raise UserError(f"--tta-views {self.tta_views}: must be between 0 (off) and 64")
        check_precision(self.precision)
        self.fit.validate()

    def params(self) -> dict:
        return flat_params(self)


def augmentation_grid(x: torch.Tensor, augment_fn, generator: torch.Generator, title: str):
    originals = x[:8]
    rows = [originals] + [augment_fn(originals, generator) for _ in range(4)]
    return plots.image_grid_figure(rows, ["original"] + [f"augmented #{i + 1}" for i in range(4)], title)


def run_baseline(cfg: BaselineConfig, checkpoint_dir: str | Path | None = None) -> dict[str, float]:
    """Train one baseline on one label draw, log everything to MLflow, return the test metrics."""
    cfg.validate()
    configure_threads()
    device = pick_device(cfg.device)
    precision = Precision.choose(cfg.precision, device)
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    generator = seed_everything(cfg.seed, device)
    data = labeled_tensors(mnist, draw, device)
    x_train, y_train = data.x_train, data.y_train
    spec = aug.AffineSpec().scaled(cfg.augment_strength)
    augment_fn = aug.OnlineAffine(spec) if cfg.augment == "online" else None
    if cfg.augment == "offline":
        x_train, y_train = aug.offline_expand(x_train, y_train, generator)
    model = place(build_classifier(cfg.model), device)
    run_name = cfg.run_name or f"baseline-{cfg.model}-seed{cfg.seed}"
    tags = {"job": "baseline", "model": cfg.model, "seed": cfg.seed}
    started = time.perf_counter()
    with tracking.start_run(run_name=run_name, experiment=cfg.experiment, tags=tags) as tracker:
        tracker.log_params({**cfg.params(), "device": str(device), "n_train": x_train.shape[0],
                            "precision_resolved": precision.name})  # fmt: skip
        tracker.log_draw(draw, mnist.source)
        if cfg.augment != "none":
            shown = augment_fn or (lambda x, g: random_report_transform(x, g))
            tracker.log_figure(
                augmentation_grid(
                    data.x_train, shown, torch.Generator(device).manual_seed(cfg.seed), f"augment={cfg.augment}"
                ),
                "augmentation/grid.png",
            )
        result = fit(
            model, (x_train, y_train), (data.x_val, data.y_val), cfg.fit, generator,
            augment=augment_fn, on_epoch=tracker.epoch_logger(), precision=precision,
        )  # fmt: skip
        val_topk, _ = evaluate_split(model, data.x_val, data.y_val)
        tracker.log_metrics({f"val_top{k}": v for k, v in val_topk.items()})
        tracker.log_metrics({"best_epoch": result.best_epoch + 1, "epochs_run": result.epochs_run})
        tracker.log_figure(
            plots.learning_curves_figure(result.history, f"{cfg.model}, seed {cfg.seed}", result.best_epoch),
            "evaluation/learning_curves.png",
        )
        if cfg.refit:
            model = refit_on_all_labels(cfg, data, result.epochs_run, generator, augment_fn, tracker, precision)
        test_topk, test_matrix = evaluate_split(model, data.x_test, data.y_test, cfg.tta_views, cfg.seed, precision)
        plain_topk = (
            evaluate_split(model, data.x_test, data.y_test, precision=precision)[0] if cfg.tta_views else test_topk
        )
        plain_top1 = plain_topk[1]
        if cfg.tta_views:
            tracker.log_metrics(single_view_metrics(plain_topk))
        wall = time.perf_counter() - started
        tracker.log_evaluation("test", test_topk, test_matrix, f"{cfg.model}, seed {cfg.seed}: test confusion")
        tracker.log_metrics({"wall_seconds": wall})
        with _scratch(checkpoint_dir) as folder:
            path = Path(folder) / "best.pt"
            torch.save({"kind": "fewshot-classifier", "model": cfg.model, "state_dict": model.state_dict()}, path)
            tracker.log_checkpoint(path)
        tracker.log_torch_model(model, "model", {"kind": "classifier", "model": cfg.model})
    return {"test_top1": test_topk[1], "test_plain_top1": plain_top1, "val_top1": val_topk[1], "wall_seconds": wall,
            "run_id": tracker.run_id}  # fmt: skip


def refit_on_all_labels(
    cfg: BaselineConfig,
    data: LabeledTensors,
    epochs: int,
    generator: torch.Generator,
    augment_fn,
    tracker: tracking.Tracker,
    precision: Precision | None = None,
) -> torch.nn.Module:
    """Retrain a fresh model on train + validation images for as many epochs as the early-stopped
    run trained; the 25 validation labels have chosen the length, now they also teach."""
    everything = data.all_labels()
    x, y = everything.x_train, everything.y_train
    if cfg.augment == "offline":
        x, y = aug.offline_expand(x, y, generator)
    model = place(build_classifier(cfg.model), x.device)
    refit_cfg = replace(cfg.fit, epochs=epochs, patience=0)
    fit(model, (x, y), None, refit_cfg, generator, augment=augment_fn, on_epoch=tracker.epoch_logger("refit_"),
        precision=precision)  # fmt: skip
    return model


def random_report_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the report's offline transforms, for the augmentation grid."""
    return aug.random_affine(x, aug.REPORT_TRANSFORMS["pipeline"], generator)


def _scratch(folder: str | Path | None):
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(str(folder))
    return tempfile.TemporaryDirectory()
