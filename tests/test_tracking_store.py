"""The tracking package leaves the process as it found it, resolves stores as MLflow does, and
reads models back through every URI form (``/latest`` included)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fewshot import tracking
from fewshot.encoder_source import resolve_encoder
from fewshot.errors import UserError
from tests.conftest import PROJECT_ROOT
from tests.encoders import ENCODER_NAME, log_encoder, same_weights, tiny_encoder

SIDE_EFFECTS = """
import logging, os, warnings
import matplotlib, mlflow, mlflow.data, mlflow.pytorch, numpy, sklearn, torch, torchvision  # their own filters

def state():
    levels = {n: logging.getLogger(n).level for n in ("", "mlflow", "mlflow.pytorch", "mlflow.store")}
    return list(warnings.filters), levels, dict(os.environ), mlflow.get_tracking_uri()

before = state()
import fewshot, fewshot.tracking, fewshot.encoder_source, fewshot.baseline  # noqa: E401
after = state()
changes = [f"{what}: {a} -> {b}" for what, a, b in zip(("filters", "levels", "environ", "uri"), before, after) if a != b]
print(changes or "same")
"""


def test_importing_fewshot_changes_no_process_wide_state(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", SIDE_EFFECTS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "same", done.stdout[-3000:]


def test_default_store_is_mlflows_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}" == tracking.default_tracking_uri()
    assert tracking.checkpoint_root() == tmp_path / "checkpoints"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.tracking_uri() == "http://127.0.0.1:9"
    assert tracking.checkpoint_root().parent == tracking.STORE_DIR / "checkpoints"


def test_unreachable_server_is_reported_in_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(UserError, match=r"tracking store http://127.0.0.1:9 cannot be reached"):
        tracking.check_reachable("http://127.0.0.1:9")
    assert time.monotonic() - started < 30


def test_latest_and_aliases_load_without_moving_the_callers_tracking_uri(tracking_store: str, tmp_path: Path) -> None:
    first, second = tiny_encoder(seed=1), tiny_encoder(seed=2)
    log_encoder(first, score=0.9)
    log_encoder(second, score=0.5)  # the challenger, and the latest version
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere)
    try:
        latest, source = resolve_encoder(f"models:/{ENCODER_NAME}/latest", tracking_uri=tracking_store)
        assert source.version == "2" and same_weights(latest, second)
        champion, source = resolve_encoder(f"models:/{ENCODER_NAME}@champion", tracking_uri=tracking_store)
        assert source.version == "1" and same_weights(champion, first)
        assert mlflow.get_tracking_uri() == elsewhere, "loading an encoder left the caller's store alone"
    finally:
        mlflow.set_tracking_uri(tracking_store)
    loaded = mlflow.pytorch.load_model(f"models:/{ENCODER_NAME}/latest")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), second(x), atol=1e-5)


def test_parent_run_id_names_the_run_a_step_nests_under(tracking_store: str) -> None:
    with tracking.start_run(run_name="parent") as parent, tracking.start_run(run_name="step") as step:
        pass
    assert tracking.parent_run_id(step.run_id) == parent.run_id
    assert tracking.parent_run_id(parent.run_id) is None and tracking.parent_run_id("0" * 32) is None


def test_workers_registering_one_winner_at_once_keep_one_version(tracking_store: str) -> None:
    """Two HPO workers that finish a study together both register its winner: one version stays
    (the lowest), with its alias, and the other worker is told which one it is."""
    import threading

    from mlflow.tracking import MlflowClient

    with tracking.start_run(run_name="fake-moco", tags={"job": "moco_pretrain"}) as tracker:
        encoder = tiny_encoder(seed=1)
        uri = tracker.log_torch_model(encoder, "encoder", {"kind": "encoder", "arch": "digit", "width": 4,
                                                           "feature_dim": encoder.feature_dim})  # fmt: skip
    for trial in range(3):
        ident = {"study": "s", "trial": str(trial)}
        gate, results = threading.Barrier(2), []

        def register(ident: dict[str, str] = ident, gate: threading.Barrier = gate, results: list = results) -> None:
            gate.wait()
            results.append(
                tracking.register_model_version(uri, ENCODER_NAME, 0.5 + int(ident["trial"]), once_per=ident)
            )

        threads = [threading.Thread(target=register) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        client = MlflowClient()
        kept = [
            v for v in client.search_model_versions(f"name = '{ENCODER_NAME}'") if v.tags.get("trial") == str(trial)
        ]
        assert len(kept) == 1, f"trial {trial}: versions {[v.version for v in kept]}"
        assert {version for version, _ in results} == {str(kept[0].version)}
        assert str(client.get_model_version_by_alias(ENCODER_NAME, "champion").version) == str(kept[0].version)
