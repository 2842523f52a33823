"""Shared pieces of the reliability suite: fresh stores, subprocess environments, run
queries over a whole store, and a real PostgreSQL server on 127.0.0.1 for the worker tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT
from tests.postgres_server import PostgresServer, PostgresUnavailable, start_postgres

TIMING_KEYS = {"images_per_s", "elapsed_s", "augment_share", "evaluate_s", "wall_seconds", "head_seconds"}


@pytest.fixture
def fresh_store(tmp_path: Path, _migrated_store_template: Path):
    """A factory of fresh, migrated SQLite MLflow stores under tmp_path: ``fresh_store("ref")``."""

    def make(name: str) -> str:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(_migrated_store_template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return make


def child_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a job started as a user would, pinned to one intra-op thread (the
    suite shares two cores; results are compared between processes with equal thread counts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def start_job(module: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=cwd or PROJECT_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def all_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=5000) if experiments else []


def running(tracking_uri: str) -> list[str]:
    return [f"{r.info.run_name} ({r.info.run_id})" for r in all_runs(tracking_uri) if r.info.status == "RUNNING"]


def metric_histories(tracking_uri: str, run_id: str, skip=TIMING_KEYS) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value), ...] sorted by step, every logged point kept (duplicates show)."""
    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
        if key not in skip
    }


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240, poll: float = 0.0002) -> bool:
    """SIGKILL ``proc`` the moment ``condition()`` holds. False when it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    raise AssertionError("the kill condition never held")


# ---------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    url: str  # postgresql://user:password@127.0.0.1:port/db (the password shows redaction works)
    port: int
    server: PostgresServer  # stop() / start(): a restart under running clients


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 holding an ``optuna`` database. Skips,
    saying why, when Debian's postgresql binaries or psycopg2 are absent."""
    try:
        server = start_postgres(("optuna",))
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield Postgres(url=server.url("optuna"), port=server.port, server=server)
    finally:
        server.close()
