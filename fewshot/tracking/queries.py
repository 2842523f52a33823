"""Questions about runs and model versions already in the store: states, lookups by tag, dead
runs to mark KILLED, metric histories and artifacts a resumed or summarising job reads back."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from fewshot.errors import UserError
from fewshot.tracking.store import TRACKING_ENV, first_line, redact, tracking_uri

PID_TAG = "fewshot.pid"
HOST_TAG = "fewshot.host"


def param_text(value: Any) -> str:
    return "" if value is None else str(value)


def set_run_status(run_id: str, status: str, tags: dict[str, Any] | None = None) -> None:
    """Tag a run and end it with ``status`` (FINISHED, FAILED or KILLED), from any thread or process."""
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, param_text(value))
    client.set_terminated(run_id, status)


def run_state(run_id: str) -> tuple[str, dict[str, str]] | None:
    """(status, tags) of a run, or None when it does not exist."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return run.info.status, dict(run.data.tags)


def parent_from_tags(tags: dict[str, str]) -> str | None:
    """The parent run named by a run's tags (from ``run_state``), None for a top-level run."""
    return tags.get(MLFLOW_PARENT_RUN_ID)


def parent_run_id(run_id: str) -> str | None:
    """The run a nested run belongs to (MLflow's parent tag), None for a top-level or unknown run."""
    state = run_state(run_id)
    return parent_from_tags(state[1]) if state is not None else None


def running_runs(experiment_id: str, tags: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the RUNNING runs of an experiment carrying all ``tags``."""
    clauses = ["attributes.status = 'RUNNING'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = MlflowClient().search_runs([experiment_id], " and ".join(clauses), max_results=1000)
    return [(run.info.run_id, dict(run.data.tags)) for run in runs]


# ---------------------------------------------------------------- dead runs


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_runs(job: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (on this host) is gone, e.g. after SIGKILL.

    Returns their ids. Runs from other hosts, or without our pid tag, are left alone; with
    ``job``, only runs tagged ``job = <job>`` are considered (a job's top-level start reaps its
    own dead attempts; HPO trial runs have their own heartbeat protocol).
    """
    client = MlflowClient()
    host = socket.gethostname()
    reaped = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = "attributes.status = 'RUNNING'" + (f" and tags.job = '{job}'" if job else "")
    for run in client.search_runs(experiments, filter_string=query, max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if int(tags[PID_TAG]) != os.getpid() and not pid_alive(int(tags[PID_TAG])):
            client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
            reaped.append(run.info.run_id)
    return reaped


def find_finished_run(tag: str, value: str) -> str | None:
    """The newest FINISHED run carrying ``tag = value``, in any experiment."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments,
        filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def run_summary(run_id: str) -> dict[str, Any]:
    """Status, name, params, metrics and tags of one run, as plain dicts."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"run {run_id}: {first_line(exc)} in {redact(tracking_uri())}; check the run id "
            f"(--parent-run-id) in the MLflow UI or {TRACKING_ENV}"
        ) from exc
    return {
        "run_id": run_id,
        "status": run.info.status,
        "run_name": run.info.run_name,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def latest_run_id(tag: str, value: str) -> str | None:
    """The newest run (any status) carrying ``tag = value``."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments, filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0].info.run_id if found else None


def download_artifact(run_id: str, path: str, destination: str | Path) -> Path:
    return Path(MlflowClient().download_artifacts(run_id, path, str(destination)))


# ---------------------------------------------------------------- resumed runs (moco_pretrain)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` is already logged in ``run_id`` (a resumed run skips them)."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def run_status(run_id: str) -> str | None:
    """The run's status (``RUNNING``, ``FINISHED``, ``KILLED``, ...), None when this store lacks it."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def run_exists(run_id: str) -> bool:
    return run_status(run_id) is not None
