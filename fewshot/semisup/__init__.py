"""Semi-supervised fine-tuning with the unlabeled pool: FixMatch-style consistency training.

- ``config``: ``SemisupConfig``, its checks, the weak and strong views;
- ``data``: the labeled split plus the unlabeled pool (``SemisupData``);
- ``fixmatch``: pseudo-labels (thresholds, distribution alignment) and one step's loss;
- ``model``: the classifier built from an encoder, its head warm-up, optimizer, EMA, scoring;
- ``loop``: ``train_semisup`` (no MLflow) as phases of ``SemisupTrainer``, its checkpoints;
- ``figures``: learning curves and views;
- ``job``: ``run_semisup``, the tracked, resumable MLflow job (imported from there: it loads MLflow).

The probe adapter (``linear_eval --probe semisup``) is ``fewshot.probe.semisup_probe``.
"""

from fewshot.semisup.config import (
    OPTIMIZERS,
    RANDOM_INIT,
    STRONG_PRESETS,
    TARGET_MODELS,
    THRESHOLDS,
    WEAK_SPEC,
    SemisupConfig,
)
from fewshot.semisup.data import SemisupData, semisup_data
from fewshot.semisup.fixmatch import PseudoLabeler, PseudoLabels, StepOutput, consistency_loss, pseudo_labels
from fewshot.semisup.loop import SemisupResult, load_checkpoint, train_semisup
from fewshot.semisup.model import EMA, build_model, encoder_arch, final_test_scores, model_spec, prepare_model

__all__ = [
    "EMA", "OPTIMIZERS", "RANDOM_INIT", "STRONG_PRESETS", "TARGET_MODELS", "THRESHOLDS", "WEAK_SPEC", "PseudoLabeler",
    "PseudoLabels", "SemisupConfig", "SemisupData", "SemisupResult", "StepOutput", "build_model", "consistency_loss",
    "encoder_arch", "final_test_scores", "load_checkpoint", "model_spec", "prepare_model", "pseudo_labels",
    "semisup_data", "train_semisup",
]  # fmt: skip
