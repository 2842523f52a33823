"""One MLflow child run per Optuna trial, and closing the runs of workers that died.

Why not optuna-integration's ``MLflowCallback``: it is deprecated since Optuna 4.9 (removal
planned for 6.0), it logs after a trial ends (no per-epoch values, nothing for a trial that
dies), and it relies on MLflow's active-run stack, which is thread-local: with
``--n-jobs > 1`` the worker threads have no active parent and the runs come out un-nested.
Here every child run is started with the parent's id passed explicitly.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from fewshot import tracking
from fewshot.hpo.storage import experimental_ok
from fewshot.hpo.targets import Outcome, Target

STATE_TAG = "optuna.trial_state"
TRIAL_TAG = "optuna.trial_number"
STUDY_TAG = "optuna.study_name"
WORKER_TAG = "fewshot.hpo_worker"  # host:pid of the invocation that owns a parent run
RUN_ATTR = "mlflow_run_id"  # trial user attribute: the trial's child run
MODEL_ATTR = "model_uri"  # trial user attribute: the model the trial logged (MoCo encoder)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TrialRunner:
    """The Optuna objective: a child run under ``parent_run_id`` around ``target.evaluate``."""

    target: Target
    parent_run_id: str
    study_name: str
    storage: BaseStorage  # the study's storage, as ``open_storage`` returned it
    failures: list[str] = field(default_factory=list)
    started: list[int] = field(default_factory=list)  # trial numbers this runner started (list.append is thread-safe)

    def __call__(self, trial: optuna.Trial) -> float:
        self.started.append(trial.number)
        tags = {"job": "hpo-trial", STUDY_TAG: self.study_name, TRIAL_TAG: trial.number, STATE_TAG: "RUNNING",
                "hpo_target": self.target.name}  # fmt: skip
        retry_of = retried_trial_number(self.storage, self.study_name, trial.number)
        if retry_of is not None:
            tags["optuna.retry_of_trial"] = retry_of
        pruned: optuna.TrialPruned | None = None
        with tracking.start_run(
            run_name=f"{self.study_name}-trial-{trial.number:03d}", nested=True, parent_run_id=self.parent_run_id,
            tags=tags,
        ) as child:  # fmt: skip
            trial.set_user_attr(RUN_ATTR, child.run_id)
            try:
                params = self.target.suggest(trial)
                child.log_params(params)
                outcome = self.target.evaluate(params, self._reporter(trial, child), child.log_step_metrics)
                self._finish(trial, child, outcome)
            except optuna.TrialPruned as exc:
                child.set_tags({STATE_TAG: "PRUNED"})
                pruned = exc
            except BaseException as exc:
                child.set_tags({STATE_TAG: "FAIL", "optuna.fail_reason": f"{type(exc).__name__}: {exc}"[:500]})
                self.failures.append(f"trial {trial.number}: {type(exc).__name__}: {str(exc)[:300]}")
                raise
        if pruned is not None:  # stopped early by the pruner: not a FINISHED success
            tracking.set_run_status(child.run_id, "KILLED")
            raise pruned
        return outcome.value

    def _reporter(self, trial: optuna.Trial, child: tracking.Tracker):
        def report(step: int, value: float) -> None:
            trial.report(value, step)
            child.log_step_metrics({"intermediate_value": value}, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (intermediate value {value:.4f})")

        return report

    def _finish(self, trial: optuna.Trial, child: tracking.Tracker, outcome: Outcome) -> None:
        if not (isinstance(outcome.value, float | int) and math.isfinite(outcome.value)):
            raise ValueError(f"objective value {outcome.value} is not a finite number")
        if outcome.model is not None:
            uri = child.log_torch_model(outcome.model, "encoder", outcome.model_spec or {})
            trial.set_user_attr(MODEL_ATTR, uri)
        child.log_metrics({**outcome.metrics, self.target.measure: outcome.value, "value": outcome.value})
        child.set_tags({STATE_TAG: "COMPLETE"})


def retried_trial_number(storage: BaseStorage, study_name: str, number: int) -> int | None:
    """The trial this one re-runs after its worker died (Optuna 5's Trial has no system_attrs:
    the frozen trial is read back through the storage's public lookups)."""
    study_id = storage.get_study_id_from_name(study_name)
    frozen = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
    with experimental_ok():
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def close_stale_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """Called once a trial lost its heartbeat (its worker died) and was failed and re-queued:
    end its child run FAILED, and the dead worker's parent run too."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if not run_id:
        return
    note = {STATE_TAG: "FAIL", "optuna.fail_reason": "worker lost (no heartbeat); the trial was re-queued"}
    state = tracking.run_state(run_id)
    if state is None:
        return
    status, tags = state
    if status == "RUNNING":
        tracking.set_run_status(run_id, "FAILED", note)
    parent = tracking.parent_from_tags(tags)  # from the tags just read: no second query
    parent_state = tracking.run_state(parent) if parent else None
    if parent_state is not None and parent_state[0] == "RUNNING":
        tracking.set_run_status(parent, "FAILED", {"fewshot.failure": f"worker lost during trial {trial.number}"})


def close_dead_worker_runs(experiment_id: str, study_name: str) -> list[str]:
    """End the RUNNING parent runs of this study whose worker process on this host is gone
    (killed between trials, so no stale trial points at them). Returns their run ids."""
    host = socket.gethostname()
    closed = []
    for run_id, tags in tracking.running_runs(experiment_id, {"job": "hpo", STUDY_TAG: study_name}):
        worker_host, _, pid = tags.get(WORKER_TAG, "").rpartition(":")
        if worker_host == host and pid.isdigit() and not tracking.pid_alive(int(pid)):
            tracking.set_run_status(run_id, "FAILED", {"fewshot.failure": "worker process gone"})
            closed.append(run_id)
    return closed


def trial_states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
