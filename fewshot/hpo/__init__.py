"""Hyperparameter search with Optuna, tracked in MLflow: one parent run per invocation, one
nested child run per trial, resumable and shared by any number of worker processes.

    from fewshot.hpo import HpoConfig, run_hpo
    run_hpo(HpoConfig(target="linear", n_trials=30))
"""

from fewshot.hpo.config import PRUNERS, TARGETS, Budget, HpoConfig
from fewshot.hpo.storage import default_storage_url, open_storage
from fewshot.hpo.study import ENCODER_MODEL, HpoResult, run_hpo

__all__ = [
    "ENCODER_MODEL", "PRUNERS", "TARGETS", "Budget", "HpoConfig", "HpoResult", "default_storage_url",
    "open_storage", "run_hpo",
]  # fmt: skip
