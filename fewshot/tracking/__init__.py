"""The only package that talks to MLflow. One module per job:

- ``store``: which store a job logs to (MLflow's own resolution), creating it safely, and where
  job state (workflow checkpoints, the default Optuna study) lives beside it;
- ``run``: one run (start, resume, nest, the ``mlflow run`` handoff) and the Tracker logging into it;
- ``models``: how a torch module is logged so that it loads anywhere;
- ``registry``: registered versions and aliases, and reading a logged model's files back;
- ``queries``: questions about runs already in the store (states, tags, dead runs, histories).

Every name other modules use is re-exported here: ``from fewshot import tracking``.
"""

from fewshot.tracking.models import log_torch_model
from fewshot.tracking.queries import (
    HOST_TAG,
    PID_TAG,
    download_artifact,
    find_finished_run,
    latest_run_id,
    logged_steps,
    parent_from_tags,
    parent_run_id,
    pid_alive,
    reap_dead_runs,
    run_exists,
    run_state,
    run_status,
    run_summary,
    running_runs,
    set_run_status,
)
from fewshot.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_URI_FORMS,
    SCORE_TAG,
    FetchedModel,
    fetch_model_files,
    find_model_version,
    is_mlflow_uri,
    register_model_version,
)
from fewshot.tracking.run import Tracker, git_commit, start_run, step_tags
from fewshot.tracking.store import (
    DEFAULT_EXPERIMENT,
    PROJECT_ROOT,
    STORE_DIR,
    TRACKING_ENV,
    check_reachable,
    checkpoint_root,
    configure,
    default_tracking_uri,
    open_store,
    redact,
    tracking_uri,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "DEFAULT_EXPERIMENT", "HOST_TAG", "MODEL_URI_FORMS", "PID_TAG", "PROJECT_ROOT",
    "SCORE_TAG", "STORE_DIR", "TRACKING_ENV", "FetchedModel", "Tracker", "check_reachable", "checkpoint_root",
    "configure", "default_tracking_uri", "download_artifact", "fetch_model_files", "find_finished_run",
    "find_model_version", "git_commit", "is_mlflow_uri", "latest_run_id", "log_torch_model", "logged_steps",
    "open_store", "parent_from_tags", "parent_run_id", "pid_alive", "reap_dead_runs", "redact", "register_model_version", "run_exists", "run_state",
    "run_status", "run_summary", "running_runs", "set_run_status", "start_run", "step_tags",
    "tracking_uri",
]  # fmt: skip
