"""Helpers shared by the HPO tests: a tiny encoder checkpoint, study and run lookups."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import torch

from fewshot.models import build_encoder


def write_encoder_checkpoint(path: Path, width: int = 8, seed: int = 0) -> Path:
    """A random-init digit encoder in moco_pretrain's checkpoint format (what --encoder accepts)."""
    torch.manual_seed(seed)
    encoder = build_encoder("digit", width)
    torch.save(
        {"format": "fewshot-moco-checkpoint", "version": 1, "encoder_spec": {"arch": "digit", "width": width},
         "encoder_state": encoder.state_dict()},
        path,
    )  # fmt: skip
    return path


def study_runs(study_name: str) -> list:
    """Every MLflow run (parents and children) tagged with this study."""
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`optuna.study_name` = '{study_name}'", output_format="list"
    )


def load(study_name: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=study_name, storage=storage)


def storage_url(tracking_uri: str) -> str:
    """The default Optuna storage beside a sqlite:/// tracking store."""
    return f"sqlite:///{Path(tracking_uri[len('sqlite:///') :]).parent / 'optuna.db'}"
