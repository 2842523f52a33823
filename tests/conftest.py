"""Shared fixtures: synthetic IDX data, a temporary SQLite tracking store, the real MNIST."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.data import draw_labels, load_mnist
from tests.synthetic import write_mnist_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# `--precision auto` means fp32 in the suite on every CPU (the same numbers on any machine, and the
# code path that predates bf16); tests/test_precision.py turns bf16 on where it tests it
os.environ["FEWSHOT_NATIVE_BF16"] = "0"
REAL_DATA_CANDIDATES = [os.environ.get("FEWSHOT_DATA_DIR", ""), str(PROJECT_ROOT.parent / "shared" / "data")]


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 600 train and 200 test synthetic digits as gzip IDX files."""
    return write_mnist_folder(tmp_path_factory.mktemp("synthetic_mnist"))


@pytest.fixture(scope="module")
def mnist(synthetic_data_dir: Path):
    """The synthetic digits loaded through the real IDX loader (once per test module)."""
    return load_mnist(synthetic_data_dir)


@pytest.fixture(scope="module")
def draw(mnist):
    """Draw 0 of 10 labels per class on the synthetic digits."""
    return draw_labels(mnist.train_labels, seed=0, labels_per_class=10)


@pytest.fixture(scope="session")
def _migrated_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database, made once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_store_template: Path) -> str:
    """A fresh SQLite MLflow store in a temp dir, selected through MLFLOW_TRACKING_URI."""
    shutil.copy(_migrated_store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real MNIST IDX folder (../shared/data); tests that need it skip without it."""
    from fewshot.data import find_idx_folder

    for candidate in REAL_DATA_CANDIDATES:
        if candidate and find_idx_folder(Path(candidate)) is not None:
            return Path(candidate)
    pytest.skip("real MNIST not found: set FEWSHOT_DATA_DIR or provide ../shared/data")


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` in a fresh process, as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session; on timeout the whole process group is killed, so
    workers spawned by torchrun never outlive a failed test."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
