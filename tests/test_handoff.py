"""One store for every way of starting a job: ``mlflow run`` (from the project root or another
folder), ``python -m entrypoints.<job>``, and MLFLOW_TRACKING_URI overriding both; and fresh
SQLite stores opened by several processes at the same moment. Real processes, real stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT

FAST = ["model=mlp2", "epochs=2", "tta_views=0", "refit=false"]  # a baseline run in seconds
COPIED = ("fewshot", "entrypoints", "MLproject", "conda.yaml", "pyproject.toml")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's sources: `mlflow run .` there writes its default store there."""
    root = tmp_path / "project"
    root.mkdir()
    for name in COPIED:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    return root


def user_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A shell without MLflow settings, the venv's python first on PATH (the MLproject runs `python`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "PYTHONPATH"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               FEWSHOT_DATA_DIR=str(data_dir), **extra)  # fmt: skip
    return env


def start(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """Start ``cmd`` with its output in a file (jobs started side by side never block on a pipe)."""
    log = cwd / f"job-{len(list(cwd.glob('job-*.log')))}.log"
    with log.open("w") as handle:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True), log


def mlflow_run(project: Path, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    params = [arg for p in FAST for arg in ("-P", p)]
    cmd = [sys.executable, "-m", "mlflow", "run", str(project), "-e", "baseline", "--env-manager", "local", *params]
    return start(cmd, cwd, env)


def direct_run(cwd: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, Path]:
    cmd = [sys.executable, "-m", "entrypoints.baseline", "--model", "mlp2", "--epochs", "2", "--tta-views", "0",
           "--refit", "false", *args]  # fmt: skip
    return start(cmd, cwd, env)


def finished(job: tuple[subprocess.Popen, Path], timeout: float = 900) -> str:
    proc, log = job
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()[-3000:]}") from None
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def store_runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=100)


def assert_complete_run(uri: str, run) -> None:
    """The run holds the job's metrics, its artifacts and its logged model."""
    client = MlflowClient(tracking_uri=uri)
    assert run.info.status == "FINISHED", run.info
    assert {"test_top1", "val_top1", "train_loss"} <= set(run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for folder in ("data", "evaluation") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"data/labeled_draw.json", "evaluation/test_confusion_matrix.csv"} <= artifacts, artifacts
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


def test_mlflow_run_logs_into_the_run_it_created_in_the_default_store(
    project: Path, tmp_path: Path, synthetic_data_dir: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = user_env(synthetic_data_dir)
    procs = {cwd: mlflow_run(project, cwd, env) for cwd in (project, elsewhere)}
    outputs = {cwd: finished(proc) for cwd, proc in procs.items()}
    for cwd in (project, elsewhere):
        uri = f"sqlite:///{cwd / 'mlflow.db'}"
        runs = store_runs(uri)
        assert len(runs) == 1, [(r.info.run_id, r.info.run_name, sorted(r.data.metrics)) for r in runs]
        assert_complete_run(uri, runs[0])
        assert f"run with ID '{runs[0].info.run_id}'" in outputs[cwd], "the run mlflow run created is the run"
        assert (cwd / "mlruns").is_dir(), "artifacts under mlruns/ beside mlflow.db (MLflow's default layout)"
    assert not (project / "mlruns" / "mlflow.db").exists()

    # started directly from the project root, a job meets the mlflow-run one in the same store
    finished(direct_run(project, env))
    runs = store_runs(f"sqlite:///{project / 'mlflow.db'}")
    assert len(runs) == 2 and all("test_top1" in r.data.metrics for r in runs)


def test_mlflow_tracking_uri_overrides_the_default(project: Path, tmp_path: Path, synthetic_data_dir: Path) -> None:
    elsewhere, chosen = tmp_path / "elsewhere", tmp_path / "chosen"
    elsewhere.mkdir()
    chosen.mkdir()
    uri = f"sqlite:///{chosen / 'store.db'}"
    env = user_env(synthetic_data_dir, MLFLOW_TRACKING_URI=uri)
    procs = [mlflow_run(project, elsewhere, env), direct_run(project, env)]
    for proc in procs:
        finished(proc)
    runs = store_runs(uri)
    assert len(runs) == 2, [(r.info.run_name, sorted(r.data.metrics)) for r in runs]
    for run in runs:
        assert_complete_run(uri, run)
    assert not (elsewhere / "mlflow.db").exists() and not (project / "mlflow.db").exists()


def test_four_jobs_start_together_on_a_fresh_store(tmp_path: Path, synthetic_data_dir: Path) -> None:
    """No store exists yet: the four processes race to create its schema, and all four runs finish."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    env = user_env(synthetic_data_dir, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(PROJECT_ROOT))
    procs = [direct_run(tmp_path, env, "--seed", str(seed)) for seed in range(4)]
    for proc in procs:
        finished(proc)
    runs = store_runs(uri)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["seed"] for r in runs} == {"0", "1", "2", "3"}


def test_a_store_that_fails_is_named_for_what_failed(tmp_path: Path, synthetic_data_dir: Path) -> None:
    """A SQLite file that is not a database is not reported as a server that "cannot be reached"."""
    bad = tmp_path / "not-a-db.db"
    bad.write_text("this is not SQLite\n")
    env = user_env(synthetic_data_dir, MLFLOW_TRACKING_URI=f"sqlite:///{bad}", PYTHONPATH=str(PROJECT_ROOT))
    proc, log = direct_run(tmp_path, env)
    proc.wait(timeout=600)
    out = log.read_text()
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, out[-3000:]
    assert "cannot be reached" not in lines[0] and "not-a-db.db" in lines[0], lines[0]
    assert "DatabaseError" in lines[0] or "not a database" in lines[0], lines[0]
