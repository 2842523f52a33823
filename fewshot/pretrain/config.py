"""What shapes a MoCo pretraining run: ``PretrainConfig``, its checks, and the two-view presets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fewshot import augment as aug
from fewshot.device import check_precision
from fewshot.errors import UserError
from fewshot.moco import POSITIVES, check_queue
from fewshot.models import ENCODERS

# Two-view augmentations. "digits" keeps the digit legible: mild crops that can also zoom
# out (area up to 1.2 moves the digit around), rotation and shear of a handwriting's size,
# elastic strokes, contrast jitter. "naive" is a SimCLR-like recipe (wider crops, more blur, no
# elastic strokes) kept for comparison.
VIEW_PRESETS: dict[str, aug.ViewSpec] = {
    "digits": aug.ViewSpec(
        crop_scale=(0.5, 1.2), rotation=15.0, shear=10.0, jitter=0.4, blur_probability=0.2, blur_sigma=1.0,
        elastic_alpha=30.0, elastic_sigma=4.0,
    ),
    "naive": aug.ViewSpec(crop_scale=(0.3, 1.0), rotation=10.0, shear=0.0, jitter=0.4, blur_probability=0.5),
}  # fmt: skip
M_SCHEDULES = ("cosine", "constant")
Metrics = dict[str, float]
EpochCallback = Callable[[int, Metrics], None]


@dataclass
class PretrainConfig:
    """Everything that shapes a MoCo pretraining run; ``validate`` checks it at the door."""

    arch: str = "digit"
    width: int = 32
    epochs: int = 12
    batch_size: int = 256
    lr: float = 0.06
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    moco_k: int = 4096
    moco_m: float = 0.99
    m_schedule: str = "cosine"
    moco_t: float = 0.2
    moco_dim: int = 128
    mlp: bool = True
    symmetric: bool = False
    # a query's positives: the 5 queued keys nearest its own key (NNCLR's, several), not the key itself ("key");
    # with 12 epochs the labels' repeated CV pick (stop 26, docs/design-decisions.md#moco-pretraining)
    positive: str = "nearest"
    nearest_k: int = 5
    bn_splits: int = 8
    augment: str = "digits"
    augment_strength: float = 1.0
    knn_k: int = 20
    knn_t: float = 0.1
    knn_test: bool = True
    seed: int = 0
    data_dir: str | None = None
    labels_per_class: int | None = 10
    n_labels: int | None = None
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the device does bf16 natively, else fp32 (fewshot.device)
    checkpoint_minutes: float = 10.0
    max_steps_per_epoch: int = 0  # 0: the whole pool each epoch (benchmarks and tests cut it)
    progress: bool = True

    def validate(self, world_size: int = 1) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        need(self.arch in ENCODERS, f"--arch {self.arch}: unknown encoder; choose one of {', '.join(ENCODERS)}")
        need(1 <= self.width <= 512, f"--width {self.width}: must be between 1 and 512")
        need(1 <= self.epochs <= 10000, f"--epochs {self.epochs}: must be between 1 and 10000")
        need(2 <= self.batch_size <= 65536, f"--batch-size {self.batch_size}: must be between 2 and 65536")
        need(math.isfinite(self.lr) and 0 < self.lr <= 10, f"--lr {self.lr}: must be a positive number up to 10")
        need(0 <= self.weight_decay <= 1, f"--weight-decay {self.weight_decay}: must be between 0 and 1")
        need(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
             f"--warmup-epochs {self.warmup_epochs}: must be >= 0 and below --epochs {self.epochs}")  # fmt: skip
        need(16 <= self.moco_k <= 1_000_000, f"--moco-k {self.moco_k}: must be between 16 and 1000000")
        need(0 <= self.moco_m < 1, f"--moco-m {self.moco_m}: must be in [0, 1) (0.99 or 0.999 are usual)")
        need(self.m_schedule in M_SCHEDULES, f"--m-schedule {self.m_schedule}: choose one of {', '.join(M_SCHEDULES)}")
        need(0.01 <= self.moco_t <= 10, f"--moco-t {self.moco_t}: must be between 0.01 and 10 (0.07-0.2 are usual)")
        need(2 <= self.moco_dim <= 4096, f"--moco-dim {self.moco_dim}: must be between 2 and 4096")
        need(self.positive in POSITIVES, f"--positive {self.positive}: choose one of {', '.join(POSITIVES)}")
        need(1 <= self.nearest_k < self.moco_k,
             f"--nearest-k {self.nearest_k}: must be at least 1 and below --moco-k {self.moco_k}")  # fmt: skip
        need(self.bn_splits >= 1, f"--bn-splits {self.bn_splits}: must be >= 1")
        if world_size == 1:
            need(
                self.batch_size % self.bn_splits == 0,
                f"--bn-splits {self.bn_splits}: must divide --batch-size {self.batch_size}",
            )
        need(self.augment in VIEW_PRESETS, f"--augment {self.augment}: choose one of {', '.join(VIEW_PRESETS)}")
        need(0 <= self.augment_strength <= 3, f"--augment-strength {self.augment_strength}: must be between 0 and 3")
        need(1 <= self.knn_k <= 1000, f"--knn-k {self.knn_k}: must be between 1 and 1000")
        need(0 < self.knn_t <= 10, f"--knn-t {self.knn_t}: must be in (0, 10]")
        need(self.checkpoint_minutes >= 0, f"--checkpoint-minutes {self.checkpoint_minutes}: must be >= 0")
        need(self.max_steps_per_epoch >= 0, f"max_steps_per_epoch {self.max_steps_per_epoch}: must be >= 0")
        check_precision(self.precision)
        check_queue(self.moco_k, self.batch_size, world_size, self.symmetric)

    def view_spec(self) -> aug.ViewSpec:
        return VIEW_PRESETS[self.augment].scaled(self.augment_strength)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "progress"}

    # settings a resumed run must share with its checkpoint (the rest may change)
    RESUME_KEYS = (
        "arch", "width", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "moco_k", "moco_m",
        "m_schedule", "moco_t", "moco_dim", "mlp", "symmetric", "positive", "nearest_k", "bn_splits", "augment",
        "augment_strength", "seed", "labels_per_class", "n_labels", "max_steps_per_epoch", "precision",
    )  # fmt: skip
