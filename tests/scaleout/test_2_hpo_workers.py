"""Two `hpo --target moco` workers on two hosts join one study on the PostgreSQL Optuna storage;
one is SIGKILLed mid-trial and started again, then PostgreSQL (which also holds the tracking
server's store) is restarted under them. A worker carries on or stops with one `error:` line
and is rerun. Every trial is recorded once, every child run
is nested under its own worker's parent run, the dead trial is retried with its parameters,
and the winner is registered once with the alias its score earns."""

from __future__ import annotations

import os
import signal
import time

import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from tests.scaleout.stack import Job, Machine, Stack

EXPERIMENT = "scaleout-hpo"
STUDY = "scaleout-moco"
MODEL = "fewshot-moco-encoder"
N_TRIALS = 4
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start_worker(host: Machine, stack: Stack) -> Job:
    return host.python("entrypoints.hpo", "--target", "moco", "--study-name", STUDY, "--n-trials", str(N_TRIALS),
                       "--budget", "1", "--storage", stack.optuna_url, "--data-dir", str(host.data_dir),
                       "--pruner", "none", "--heartbeat", "2", "--seed", "0", log_name="hpo")  # fmt: skip


def champion_score(client: MlflowClient) -> float | None:
    try:
        return float(client.get_model_version_by_alias(MODEL, "champion").tags["val_score"])
    except MlflowException:
        return None


def running_trial_of(study: optuna.Study, client: MlflowClient, job: Job, pids: dict[str, str]) -> int | None:
    """The number of a trial ``job``'s process is running now, its parameters drawn, else None.
    ``pids`` caches each child run's worker pid (one HTTP call per run)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and run_id not in pids:
            pids[run_id] = client.get_run(run_id).data.tags.get("fewshot.pid", "")
        if run_id and trial.params and pids[run_id] == str(job.proc.pid):
            return trial.number
    return None


def kill_mid_trial(study: optuna.Study, client: MlflowClient, job: Job, deadline: float) -> int:
    """Freeze ``job`` (SIGSTOP); if it is inside a trial, its parameters drawn, SIGKILL it there,
    else let it go on and look again. Frozen while we look, it cannot finish the trial meanwhile."""
    pids: dict[str, str] = {}
    while time.monotonic() < deadline:
        assert job.proc.poll() is None, f"the worker finished before it was seen mid-trial (pid {job.proc.pid}, " \
                                        f"child runs seen: {pids}): {job.output()[-3000:]}"  # fmt: skip
        os.kill(job.proc.pid, signal.SIGSTOP)
        number = running_trial_of(study, client, job, pids)
        if number is not None:
            job.kill()
            return number
        os.kill(job.proc.pid, signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError(f"the worker was never seen mid-trial: {job.output()[-3000:]}")


def observer(stack: Stack) -> optuna.Study:
    """The study as the operator sees it; its pooled connections are checked before use, so it
    outlives the database restart (as the workers' storage does)."""
    storage = RDBStorage(stack.optuna_url, engine_kwargs={"pool_pre_ping": True})
    return optuna.load_study(study_name=STUDY, storage=storage)


def finish_or_stop_cleanly(job: Job, host: Machine, stack: Stack, outputs: dict[str, str], name: str) -> Job | None:
    """Wait for a worker: it finishes, or it stops with one `error:` line about the storage
    (then the same command is rerun on its host). Returns the rerun, if any."""
    out = job.wait(timeout=300)
    outputs[name] = out
    if job.proc.returncode == 0:
        return None
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the Optuna storage") and "rerun the same command" in last, out[-3000:]
    return start_worker(host, stack)


def test_two_workers_one_study_through_a_killed_worker_and_a_postgres_restart(stack: Stack, machine, client):
    before = champion_score(client)
    host_b, host_c = machine("hpo-host-b", EXPERIMENT), machine("hpo-host-c", EXPERIMENT)
    b, c = start_worker(host_b, stack), start_worker(host_c, stack)
    c.wait_for(lambda: "study scaleout-moco" in c.output() and "study scaleout-moco" in b.output(), timeout=300)
    study = observer(stack)
    killed = kill_mid_trial(study, client, c, time.monotonic() + 300)
    outputs = {"c": c.output()}
    c = start_worker(host_c, stack)  # the same command on the same host after the crash
    c.wait_for(lambda: len(study.get_trials(deepcopy=False, states=FINISHED)) >= 2, timeout=300)
    done_before = {t.number: t.value for t in study.get_trials(deepcopy=False, states=FINISHED)}
    stack.postgres.stop("fast")  # every client connection is cut: both workers' and the tracking server's
    time.sleep(1.0)
    stack.postgres.start()
    workers = [(b, host_b, "b"), (c, host_c, "c-rerun")]
    while workers:
        job, host, name = workers.pop(0)
        rerun = finish_or_stop_cleanly(job, host, stack, outputs, name)
        if rerun is not None:
            workers.append((rerun, host, name + "-again"))
    for name, out in outputs.items():
        assert "Traceback" not in out and "s3cret-pw" not in out, f"{name}: {out[-3000:]}"

    study = optuna.load_study(study_name=STUDY, storage=stack.optuna_url)
    trials = study.get_trials(deepcopy=False)
    assert len(study.get_trials(deepcopy=False, states=FINISHED)) >= N_TRIALS
    for number, value in done_before.items():
        assert trials[number].value == value, "a trial finished before the restart is kept as it was"
    assert trials[killed].state == TrialState.FAIL, "the killed worker's trial is failed by the heartbeat check"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and trials[killed].params.items() <= retries[0].params.items()

    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`optuna.study_name` = '{STUDY}'", max_results=500)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("job") == "hpo"}
    children = [r for r in runs if r.data.tags.get("job") == "hpo-trial"]
    assert len(parents) == len(outputs), "one parent run per worker process"
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "no trial left RUNNING"
    # a trial created just as the database went away fails before its objective starts: no child run;
    # a retry still WAITING when the study reached its trials carries its dead original's attributes
    started = sorted(t.number for t in trials if "mlflow_run_id" in t.user_attrs and t.state != TrialState.WAITING)
    assert all(t.number in started for t in trials if t.state in FINISHED)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == started, (
        f"one child run per trial: {[(t.number, t.state.name, t.system_attrs.get('failed_trial')) for t in trials]}"
    )
    for child in children:
        parent = parents[child.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["fewshot.hpo_worker"].endswith(":" + child.data.tags["fewshot.pid"]), "own worker"
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            (child,) = [r for r in children if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
            assert child.info.status == "FINISHED" and child.data.metrics["value"] == trial.value
    assert client.get_run(trials[killed].user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert all(r.info.status != "RUNNING" for r in runs), [r.info.run_name for r in runs if r.info.status == "RUNNING"]

    versions = client.search_model_versions(f"name = '{MODEL}'")
    (winner,) = [v for v in versions if v.tags.get("study") == STUDY]
    assert winner.tags["trial"] == str(study.best_trial.number)
    expected = "champion" if before is None or round(study.best_value, 6) > before else "challenger"
    assert client.get_model_version_by_alias(MODEL, expected).version == winner.version
