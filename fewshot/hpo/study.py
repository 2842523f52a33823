"""``run_hpo``: one invocation (worker) of a study: parent run, trials, summary, winner, registry."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import optuna
from optuna.storages import BaseStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from fewshot import tracking
from fewshot.data import draw_labels, load_mnist
from fewshot.device import configure_threads, pick_device
from fewshot.errors import UserError
from fewshot.hpo import distributed
from fewshot.hpo import storage as st
from fewshot.hpo.config import HpoConfig
from fewshot.hpo.optuna_compat import connection_lost
from fewshot.hpo.summary import log_study_summary
from fewshot.hpo.targets import make_target
from fewshot.hpo.trials import (
    MODEL_ATTR,
    RUN_ATTR,
    STUDY_TAG,
    WORKER_TAG,
    TrialRunner,
    close_dead_worker_runs,
    close_stale_trial_run,
    params_text,
    trial_states,
    worker_id,
)
from fewshot.names import MOCO_ENCODER_MODEL
from fewshot.pretrain import init_distributed

ENCODER_MODEL = MOCO_ENCODER_MODEL
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 5
REPORT_ONLY = "report-only: the winner's test score, computed after the search; never seen by the sampler or pruner"


@dataclass
class HpoResult:
    study_name: str
    storage: str
    parent_run_id: str | None
    trials_run: int  # by this invocation
    states: dict[str, int]  # whole study
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_trial: int | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    registered: tuple[str, str] | None = None  # (version, alias)
    follower: bool = False  # a torchrun rank other than 0: trained the trials, logged nothing


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    return optuna.pruners.NopPruner()


def open_study(cfg: HpoConfig, url: str, name: str, identity: dict[str, str]) -> tuple[optuna.Study, BaseStorage, bool]:
    """Create the study, or load it and check it was made for the same search. Returns (study, storage, created)."""
    storage = st.open_storage(url, cfg.heartbeat_seconds, on_stale=close_stale_trial_run)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    created = name not in existing
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    if created:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return study, storage, True
    found = {k: str(v) for k, v in study.user_attrs.items() if k in identity}
    differs = [f"{k} {found[k]!r} (now {v!r})" for k, v in identity.items() if k in found and found[k] != v]
    if differs:
        raise UserError(
            f"--study-name {name}: that study was made with {', '.join(differs)}; rerun with the same options "
            "or pick another --study-name"
        )
    return study, storage, False


def _sampler(cfg: HpoConfig, study: optuna.Study, created: bool) -> optuna.samplers.BaseSampler:
    """TPE seeded from --seed; a process joining an existing study (another worker, a resume)
    also mixes in its pid, so two workers do not propose the same first trials."""
    seed = cfg.seed * 1_000_003 + len(study.get_trials(deepcopy=False))
    if not created:
        seed += os.getpid() * 7919
    with st.experimental_ok():  # constant_liar and multivariate are experimental
        return optuna.samplers.TPESampler(seed=seed % (2**32), constant_liar=True, multivariate=True)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class StopAfterFailures:
    """Stop this worker after ``MAX_FAILURES_IN_A_ROW`` failed trials of its own in a row (the
    study's trial count is Optuna's ``MaxTrialsCallback``)."""

    def __init__(self) -> None:
        self.failures_in_a_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            study.stop()


@contextlib.contextmanager
def _storage_outage_stops(url: str, name: str) -> Iterator[None]:
    """The study's database lost mid-study (a server restart, a network cut): stop this worker
    with one line. Finished trials are in the storage; rerunning the command rejoins the study,
    and the trial that was running is retried once its heartbeat goes stale."""
    try:
        yield
    except Exception as exc:
        # Optuna can mask the storage error: a failed tell surfaces as UnboundLocalError, the storage error in its chain
        if not isinstance(exc, (optuna.exceptions.StorageInternalError, SQLAlchemyError)) and not connection_lost(exc):
            raise
        cause = str(exc.__cause__ or exc.__context__ or exc).strip().splitlines()
        raise UserError(
            f"the Optuna storage {tracking.redact(url)} failed mid-study ({cause[0][:200] if cause else type(exc).__name__}); "
            f"rerun the same command to rejoin study {name}"
        ) from exc


def run_hpo(cfg: HpoConfig, echo=print) -> HpoResult:
    """Run (or resume, or join) a study until it holds ``cfg.n_trials`` finished trials."""
    budget = cfg.validate()
    rank, world = init_distributed(cfg.device)  # (0, 1) unless started by torchrun
    distributed.check_target(cfg.target, cfg.n_jobs, world)
    configure_threads()
    device = pick_device(cfg.device)
    mnist = load_mnist(cfg.data_dir)
    draw = draw_labels(mnist.train_labels, cfg.seed, cfg.labels_per_class, cfg.n_labels)
    name = cfg.study_name or f"hpo-{cfg.target}-{time.strftime('%Y%m%d-%H%M%S')}"
    url = cfg.storage or st.default_storage_url()
    if rank != 0:  # a torchrun follower: trains each trial rank 0 runs, logs nothing
        ran = distributed.follow(make_target(cfg, mnist, draw, device, budget)) if cfg.n_trials else 0
        return HpoResult(name, url, None, ran, {}, follower=True)
    with st.init_lock(tracking.tracking_uri(), url):  # fresh SQLite stores are created by one process at a time
        experiment_id = tracking.configure(cfg.experiment)
        # the target loads the encoder: a bad URI fails before any study or run is made
        target = make_target(cfg, mnist, draw, device, budget) if cfg.n_trials else None
        study, storage, created = open_study(cfg, url, name, cfg.identity(budget))
    echo(f"study {name} ({'created' if created else 'resumed'}) in {st.describe(url)} storage "
         f"{tracking.redact(url)}; rerun with --study-name {name} to resume or add workers")  # fmt: skip
    if cfg.n_trials == 0:
        return HpoResult(name, url, None, 0, trial_states(study))
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(cfg, study, created),
                              pruner=make_pruner(cfg.pruner))  # fmt: skip
    close_dead_worker_runs(experiment_id, name)
    tags = {"job": "hpo", "hpo_target": cfg.target, STUDY_TAG: name, WORKER_TAG: worker_id(), "seed": cfg.seed}
    with tracking.start_run(run_name=f"{name}-worker", experiment=cfg.experiment, tags=tags) as parent:
        parent.log_params({**cfg.params(), "study_name": name, "storage": tracking.redact(url),
                           "storage_kind": st.describe(url), "sampler": type(study.sampler).__name__,
                           "pruner_class": type(study.pruner).__name__, "objective": target.measure,
                           "budget_parsed": str(budget), "n_folds_used": len(target.data.splits)})  # fmt: skip
        parent.log_draw(draw, mnist.source)
        runner = TrialRunner(target, parent.run_id, name, storage)
        objective = distributed.LeaderObjective(runner) if world > 1 else runner
        stopper = StopAfterFailures()
        with _storage_outage_stops(url, name):
            try:
                if _finished(study) < cfg.n_trials:
                    with st.experimental_ok():  # Optuna calls fail_stale_trials (experimental) before each trial
                        study.optimize(objective, n_trials=None, timeout=cfg.timeout or None, n_jobs=cfg.n_jobs,
                                       callbacks=[MaxTrialsCallback(cfg.n_trials, states=FINISHED), stopper],
                                       catch=(Exception,))  # fmt: skip
            finally:
                if world > 1:
                    distributed.LeaderObjective.finish()
            st.settle_dead_trials(study, cfg.heartbeat_seconds, echo)
        if stopper.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            last = runner.failures[-1] if runner.failures else "see the failed trials' runs"
            raise UserError(f"{MAX_FAILURES_IN_A_ROW} trials failed in a row ({last}); fix the cause and resume")
        ran = len(runner.started)
        result = HpoResult(name, url, parent.run_id, ran, trial_states(study))
        parent.log_metrics({"trials_run_here": ran, **{f"trials_{k.lower()}": v for k, v in result.states.items()}})
        _summarise(cfg, study, parent, target, mnist, result, echo)
    return result


def _summarise(cfg, study, parent, target, mnist, result: HpoResult, echo) -> None:
    skipped = log_study_summary(parent, study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        parent.set_tags({"hpo_best": "none: no trial completed"})
        echo(f"no trial completed ({result.states}); plots skipped: {', '.join(skipped) or 'none'}")
        return
    best = study.best_trial
    result.best_value, result.best_params, result.best_trial = best.value, dict(best.params), best.number
    parent.log_metrics({"best_value": best.value, f"best_{target.measure}": best.value, "best_trial": best.number})
    parent.log_params({f"best_{k}": v for k, v in best.params.items()})
    parent.set_tags({"best_trial_run_id": best.user_attrs.get(RUN_ATTR, ""), "objective": target.measure})
    parent.log_dict({"value": best.value, "measure": target.measure, "trial": best.number, "params": best.params},
                    "hpo/best.json")  # fmt: skip
    report = target.report_winner(best.params, best, mnist)  # the only place the test set is read
    result.test_metrics = report.metrics
    parent.log_metrics(report.metrics)
    parent.set_tags({"test_metrics": REPORT_ONLY})
    echo(f"best trial {best.number}: {target.measure} {best.value:.4f} ({params_text(best.params)}); "
         f"test top-1 {report.metrics['test_top1']:.4f} (report-only)")  # fmt: skip
    if cfg.target == "moco":
        result.registered = _register(study, best, report.metrics, report.val_measure)
        parent.set_tags({"registered_version": result.registered[0], "registered_alias": result.registered[1]})
        echo(f"{ENCODER_MODEL} version {result.registered[0]} -> @{result.registered[1]}")


def _register(study: optuna.Study, best: FrozenTrial, test: dict[str, float], measure: str) -> tuple[str, str]:
    """The best trial's encoder as a new version (once per study and trial, whichever worker gets here first)."""
    ident = {"study": study.study_name, "trial": str(best.number)}
    found = tracking.find_model_version(ENCODER_MODEL, ident)
    if found is not None:
        return found[0], (found[1][0] if found[1] else "none")
    tags = {"val_measure": measure, "test_top1": f"{test['test_top1']:.6f}",
            "test_score": "report-only (never used to pick the champion)",
            "source_run": best.user_attrs.get(RUN_ATTR, ""), "params": json.dumps(best.params)}  # fmt: skip
    version, alias = tracking.register_model_version(best.user_attrs[MODEL_ATTR], ENCODER_MODEL, best.value, tags,
                                                     once_per=ident)  # fmt: skip
    return str(version), alias
