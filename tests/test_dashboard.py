"""optuna-dashboard on the study storage: started as a real server on 127.0.0.1 (through
``make dashboard``'s module, and as the plain ``optuna-dashboard`` command a user would type),
its HTTP API lists a real study with its trials."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from fewshot.hpo.storage import open_storage
from tests.conftest import PROJECT_ROOT

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard (a dev dependency) is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_study(url: str, name: str) -> None:
    study = optuna.create_study(storage=open_storage(url), study_name=name, direction="maximize")
    study.optimize(lambda t: -((t.suggest_float("x", -2, 2) - 0.5) ** 2), n_trials=4)


def _studies(port: int, proc: subprocess.Popen, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as answer:
                return json.loads(answer.read())["study_summaries"]
        except OSError:
            time.sleep(1)
    raise AssertionError("optuna-dashboard did not answer")


@pytest.mark.parametrize("how", ["make-dashboard-module-on-journal", "optuna-dashboard-cli-on-sqlite"])
def test_dashboard_lists_a_real_study(how: str, tmp_path: Path) -> None:
    port = _free_port()
    if how.endswith("journal"):
        url = f"journal:///{tmp_path / 'study.log'}"
        command = [sys.executable, "-m", "fewshot.hpo.dashboard", "--storage", url, "--port", str(port)]
    else:
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        cli = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
        assert cli, "optuna-dashboard is importable but its command is not installed beside python"
        command = [cli, url, "--host", "127.0.0.1", "--port", str(port)]
    _small_study(url, "small")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        studies = _studies(port, proc)
        (small,) = [s for s in studies if s["study_name"] == "small"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{small['study_id']}", timeout=30) as answer:
            detail = json.loads(answer.read())
        assert len(detail["trials"]) == 4 and all(t["state"] == "Complete" for t in detail["trials"])
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # seen once in CI: the server outlived SIGTERM; do not leak it
            proc.kill()
            proc.communicate(timeout=30)
