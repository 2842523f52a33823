"""Helpers shared by the HPO tests: a tiny encoder checkpoint, study and run lookups."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import mlflow
import optuna
import torch
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from fewshot.models import build_encoder

# what a read of a SQLite study raises while a worker holds the write lock (Optuna wraps
# SQLAlchemy's OperationalError in StorageInternalError)
LOCKED = (OperationalError, StorageInternalError)


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


def freeze_mid_trial(proc: subprocess.Popen, study: optuna.Study, number: int) -> bool:
    """SIGSTOP the worker and tell whether trial ``number`` is mid-trial in the frozen process:
    RUNNING, its parameters sampled. When it is not (not yet sampled, finished meanwhile, or the
    frozen worker holds the lock) the worker is let go on (SIGCONT) and False comes back. Kill a
    frozen worker and the kill lands mid-trial however short the trials are."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        trial = study.trials[number]
        still_running = trial.state == TrialState.RUNNING and bool(trial.params)
    except LOCKED:
        still_running = False
    if not still_running:
        os.kill(proc.pid, signal.SIGCONT)
    return still_running
