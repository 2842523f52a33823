"""The linear classification protocol and the other probes of a pretrained encoder, as one job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from fewshot import plots, tracking
from fewshot.data import NUM_CLASSES, LabeledTensors, draw_labels, labeled_tensors, load_mnist
from fewshot.device import (
    Precision,
    check_precision,
    configure_threads,
    pick_device,
    precision_context,
    seed_everything,
)
from fewshot.embedding import METHODS as EMBEDDINGS
from fewshot.embedding import embedding_figure
from fewshot.encoder_source import DEFAULT_ENCODER, EncoderSource, resolve_encoder
from fewshot.errors import UserError
from fewshot.evaluate import confusion_matrix, predict_logits, single_view_metrics, topk_accuracy
from fewshot.linear_head import FeatureSet, cached_features, encode
from fewshot.models import with_feature_grid
from fewshot.probe import (
    DEFAULT_FEATURE_GRID,
    PROBES,
    ProbeContext,
    ProbeResult,
    ProbeSettings,
    default_feature_maps,
    run_probe,
)
from fewshot.train import FitConfig, flat_params

# online: a mild random affine; strong: augment.STRONG_DIGITS with crossbars; auto: none for linear and kNN,
# strong for fine-tuning
AUGMENT_CHOICES = ("auto", "none", "online", "strong")
VIEWS = {"online": "affine", "strong": "strong"}


@dataclass
class LinearEvalConfig:
    encoder: str = DEFAULT_ENCODER
    probe: str = "linear"
    standardize: bool = True
    augment: str = "auto"
    augment_strength: float = 1.0
    bar: float = 0.3  # strong augmentation: share of images given a crossbar
    knn_k: int = 20
    knn_temperature: float = 0.1
    encoder_lr_ratio: float = 0.1
    tta_views: int = 8  # fine-tuning only, as the CNN baseline: test scores over the image and 8 warped copies
    feature_grid: int = DEFAULT_FEATURE_GRID  # not for semisup, which trains its own global-pool classifier
    # 2: also the map before the last down-sampling (the digit encoder's 14x14); None: the probe's default
    # (fewshot.probe.default_feature_maps: 2 for the linear probe on the digit encoder, else 1)
    feature_maps: int | None = None
    refit: bool = True
    normalize: bool = True
    embedding: str = "pca"
    seed: int = 0
    data_dir: str | None = None
    labels_per_class: int | None = 10
    n_labels: int | None = None
    run_name: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device does bf16 natively, else fp32 (fewshot.device)
    fit: FitConfig = field(default_factory=FitConfig)

    def validate(self) -> None:
        if self.probe not in PROBES:
            raise UserError(f"--probe {self.probe}: unknown probe; choose one of {', '.join(PROBES)}")
        if self.augment not in AUGMENT_CHOICES:
            raise UserError(f"--augment {self.augment}: choose one of {', '.join(AUGMENT_CHOICES)}")
        if self.probe == "knn" and self.augment in VIEWS:
            raise UserError(
                f"--augment {self.augment}: the kNN probe trains nothing; drop --augment or use --probe linear"
            )
        if not 0 <= self.bar <= 1:
            raise UserError(f"--bar {self.bar}: must be between 0 and 1 (a share of the images)")
        if not 0 <= self.augment_strength <= 3:
            raise UserError(f"--augment-strength {self.augment_strength}: must be between 0 and 3")
        if self.knn_k < 1:
            raise UserError(f"--knn-k {self.knn_k}: must be >= 1")
        if not self.knn_temperature > 0:
            raise UserError(f"--knn-temperature {self.knn_temperature}: must be > 0")
        if not 0 <= self.tta_views <= 64:
            raise UserError(f"--tta-views {self.tta_views}: must be between 0 (off) and 64")
        if not 0 < self.encoder_lr_ratio <= 10:
            raise UserError(f"--encoder-lr-ratio {self.encoder_lr_ratio}: must be in (0, 10]")
        if not 1 <= self.feature_grid <= 4:
            raise UserError(f"--feature-grid {self.feature_grid}: must be between 1 and 4")
        if self.feature_maps not in (None, 1, 2):
            raise UserError(f"--feature-maps {self.feature_maps}: must be 1 (the last map) or 2 (also the one before)")
        if self.embedding not in EMBEDDINGS:
            raise UserError(f"--embedding {self.embedding}: choose one of {', '.join(EMBEDDINGS)}")
        if self.probe == "finetune" and self.fit.optimizer == "lbfgs":
            raise UserError("--optimizer lbfgs: L-BFGS has one learning rate for all parameters; fine-tune with adamw")
        check_precision(self.precision)
        self.fit.validate()

    @property
    def augmentation(self) -> str:
        """The augmentation in effect: none, online or strong (``auto`` resolved for the probe)."""
        if self.augment != "auto":
            return self.augment
        return "strong" if self.probe == "finetune" else "none"

    def settings(self) -> ProbeSettings:
        return ProbeSettings(
            fit=self.fit, standardize=self.standardize, augment=self.augmentation != "none",
            augment_view=VIEWS.get(self.augmentation, "strong"), augment_strength=self.augment_strength, bar=self.bar,
            knn_k=self.knn_k, knn_temperature=self.knn_temperature, encoder_lr_ratio=self.encoder_lr_ratio,
            refit=self.refit, normalize=self.normalize, tta_views=self.tta_views if self.probe == "finetune" else 0,
        )  # fmt: skip

    @property
    def grid(self) -> int:
        return 1 if self.probe == "semisup" else self.feature_grid

    @property
    def maps(self) -> int:
        if self.probe == "semisup":
            return 1
        return default_feature_maps(self.probe) if self.feature_maps is None else self.feature_maps

    def for_encoder(self, arch: str) -> LinearEvalConfig:
        """The config with the read-out's default resolved for an encoder of ``arch``."""
        if self.feature_maps is not None:
            return self
        return replace(self, feature_maps=default_feature_maps(self.probe, arch))

    def params(self) -> dict:
        flat = flat_params(self)
        flat["augment"] = self.augmentation
        flat["feature_grid"], flat["feature_maps"] = self.grid, self.maps
        return flat

    def readout_spec(self) -> dict:
        """How the classifier reads the encoder, in the logged models' spec.json."""
        return {"feature_grid": self.grid, "feature_maps": self.maps}


def _head_spec(probe: str, feature_dim: int, readout: dict) -> dict:
    kind = "knn_head" if probe == "knn" else "linear_head"
    return {"kind": kind, "in_features": feature_dim, "num_classes": NUM_CLASSES, "probe": probe, **readout}


def _embedding_features(result: ProbeResult, features: FeatureSet, x_test: torch.Tensor) -> torch.Tensor:
    """Test features of the encoder the classifier uses (the fine-tuned one after fine-tuning)."""
    if result.frozen:
        return features.test
    return encode(result.classifier.encoder, x_test)


def run_linear_eval(cfg: LinearEvalConfig) -> dict:
    """Probe one encoder on one label draw, log everything to MLflow, return the headline numbers."""
    cfg.validate()
    configure_threads()
    device = pick_device(cfg.device)
    precision = Precision.choose(cfg.precision, device)
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    encoder, source = resolve_encoder(cfg.encoder)  # before the run: a bad URI leaves no run behind
    cfg = cfg.for_encoder(source.arch)
    encoder = with_feature_grid(encoder, cfg.grid, cfg.maps)
    generator = seed_everything(cfg.seed, device)
    started = time.perf_counter()
    features = cached_features(encoder, mnist, draw, device, precision=precision)
    images = labeled_tensors(mnist, draw, device)
    run_name = cfg.run_name or f"linear_eval-{cfg.probe}-seed{cfg.seed}"
    tags = {"job": "linear_eval", "probe": cfg.probe, "seed": cfg.seed, **source.tags()}
    with tracking.start_run(run_name=run_name, tags=tags) as tracker:
        tracker.log_params({**cfg.params(), **source.params(), "device": str(device),
                            "precision_resolved": precision.name})  # fmt: skip
        tracker.log_draw(draw, mnist.source)
        ctx = ProbeContext(
            encoder=encoder, features=features, images=images, settings=cfg.settings(), generator=generator,
            device=device, mnist=mnist, draw=draw, on_epoch=tracker.epoch_logger(), precision=precision,
        )  # fmt: skip
        result = run_probe(cfg.probe, ctx)  # raises FrozenWeightsChanged if the loaded encoder moved
        tracker.set_tags({"frozen_check": "passed" if result.frozen else "passed (fine-tuned a copy)"})
        summary = log_probe_result(tracker, cfg, source, result, features, images, precision)
        summary["wall_seconds"] = time.perf_counter() - started
        tracker.log_metrics({"wall_seconds": summary["wall_seconds"], "feature_seconds": features.seconds})
    return {**summary, "run_id": tracker.run_id}


def log_probe_result(
    tracker: tracking.Tracker,
    cfg: LinearEvalConfig,
    source: EncoderSource,
    result: ProbeResult,
    features: FeatureSet,
    images: LabeledTensors,
    precision: Precision | None = None,
) -> dict:
    title = f"{cfg.probe} probe, seed {cfg.seed}"
    val_topk = topk_accuracy(result.val_scores, features.y_val)
    test_topk = topk_accuracy(result.test_scores, features.y_test)
    val_matrix = confusion_matrix(features.y_val.cpu(), result.val_scores.argmax(1).cpu())
    test_matrix = confusion_matrix(features.y_test.cpu(), result.test_scores.argmax(1).cpu())
    tracker.log_evaluation("val", val_topk, val_matrix, f"{title}: validation confusion")
    tracker.log_evaluation("test", test_topk, test_matrix, f"{title}: test confusion")
    tracker.log_metrics({"head_seconds": result.head_seconds})
    if result.fit is not None and result.fit.history:
        tracker.log_metrics({"best_epoch": result.fit.best_epoch + 1, "epochs_run": result.fit.epochs_run})
        tracker.log_figure(
            plots.learning_curves_figure(result.fit.history, title, result.fit.best_epoch),
            "evaluation/learning_curves.png",
        )
    if cfg.embedding != "none":
        embedded = _embedding_features(result, features, images.x_test)
        tracker.log_figure(
            embedding_figure(embedded, features.y_test, cfg.embedding, f"{source.arch} features, {title}", cfg.seed),
            f"evaluation/embedding_{cfg.embedding}.png",
        )
    # consistency of the logged classifier with the scores measured above (images in, scores out)
    own_scores = result.test_scores if result.plain_test_scores is None else result.plain_test_scores
    if result.plain_test_scores is not None:
        tracker.log_metrics(single_view_metrics(topk_accuracy(result.plain_test_scores, features.y_test)))
    with precision_context(precision):
        check = predict_logits(result.classifier, images.x_test[:500])
    # under bf16 the classifier runs its head in bf16 where the probe scored fp32 features: 1% of the scale
    tolerance = 1e-2 * float(own_scores[:500].abs().max()) if precision is not None and precision.bf16 else 1e-4
    if not torch.allclose(check, own_scores[:500], rtol=1e-4, atol=tolerance):
        raise RuntimeError("the classifier to be logged and the probe disagree on the test images")
    tracker.log_torch_model(result.head, "head", _head_spec(cfg.probe, features.feature_dim, cfg.readout_spec()))
    classifier_uri = tracker.log_torch_model(
        result.classifier, "classifier",
        {"kind": "encoder_classifier", "arch": source.arch, "width": source.width,
         "feature_dim": features.feature_dim, **cfg.readout_spec(), "head": cfg.probe, "num_classes": NUM_CLASSES},
    )  # fmt: skip
    return {
        "probe": cfg.probe,
        "val_top1": val_topk[1],
        **{f"test_top{k}": v for k, v in test_topk.items()},
        "head_seconds": result.head_seconds,
        "feature_seconds": features.seconds,
        "classifier_uri": classifier_uri,
    }
