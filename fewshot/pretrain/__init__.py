"""MoCo pretraining on the unlabeled pool.

- ``config``: ``PretrainConfig`` and the two-view presets;
- ``monitor``: kNN accuracy per epoch and the registry's leave-one-out selection score;
- ``checkpoint``: reading a checkpoint back, RNG states, the encoder inside a checkpoint;
- ``loop``: ``pretrain`` (no MLflow; the search calls it) as phases of ``MocoTrainer``;
- ``job``: ``run_pretrain``, the tracked, resumable MLflow job (imported from there: it loads MLflow).
"""

from fewshot.pretrain.checkpoint import encoder_from_checkpoint, load_checkpoint, plain_encoder
from fewshot.pretrain.config import M_SCHEDULES, VIEW_PRESETS, PretrainConfig
from fewshot.pretrain.loop import PretrainResult, init_distributed, pretrain
from fewshot.pretrain.monitor import knn_accuracy, loo_knn_accuracy, selection_score

__all__ = [
    "M_SCHEDULES", "VIEW_PRESETS", "PretrainConfig", "PretrainResult", "encoder_from_checkpoint", "init_distributed",
    "knn_accuracy", "load_checkpoint", "loo_knn_accuracy", "plain_encoder", "pretrain", "selection_score",
]  # fmt: skip
