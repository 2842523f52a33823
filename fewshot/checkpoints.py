"""Checkpoint files: written atomically, read back without unpickling code, checked for format."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fewshot.errors import UserError


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename over the target: a reader sees the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checked(
    path: str | Path, fmt: str, version: int, required: tuple[str, ...], kind: str, hint: str = ""
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format, version and keys;
    every problem is a one-line UserError naming ``--resume``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, wrong file type
        raise UserError(
            f"--resume {path}: not a readable checkpoint ({type(exc).__name__}); delete it or pass another"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else None
        raise UserError(f"--resume {path}: not a fewshot {kind} checkpoint (format {found!r}){hint}")
    if state.get("version") != version:
        raise UserError(f"--resume {path}: checkpoint version {state.get('version')} (this code reads {version})")
    for key in required:
        if key not in state:
            raise UserError(f"--resume {path}: checkpoint lacks {key!r}; it is incomplete")
    return state


def check_same_settings(saved: dict[str, Any], cfg: Any, keys: tuple[str, ...]) -> None:
    """A resume must not change the settings that shape training: compare ``cfg``'s ``keys``
    with the checkpoint's saved config; one-line UserError naming what differs."""
    changed = [k for k in keys if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise UserError(
            f"--resume: the checkpoint was made with other settings ({diffs}); rerun with them or start fresh"
        )


def resolve_resume(
    resume: str, default_path: Path, load: Callable[[str | Path], dict[str, Any]], redo_logging: bool = True
) -> dict[str, Any] | None:
    """The state a job continues from. ``auto``: ``default_path`` when it holds an unfinished
    run, or (with ``redo_logging``) a finished training whose MLflow run was stopped before it
    logged its results (only the logging is then redone); ``never``: start fresh; anything else
    is a checkpoint path that must load."""
    if resume == "never":
        return None
    if resume == "auto":
        if not default_path.is_file():
            return None
        state = load(default_path)
        if not state.get("finished"):
            return state
        return state if redo_logging and _logging_unfinished(state) else None
    return load(resume)


def _logging_unfinished(state: dict[str, Any]) -> bool:
    from fewshot import tracking  # here, not at the top: reading a checkpoint must not load MLflow

    run_id = state.get("mlflow_run_id")
    if run_id is None:
        return False
    tracking.configure()
    return tracking.run_status(run_id) not in (None, "FINISHED")
