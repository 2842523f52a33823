"""``hpo --target moco`` under torchrun: each trial's MoCo pretraining runs on every process.

    torchrun --nproc_per_node 2 -m entrypoints.hpo --target moco ...

Rank 0 owns the study and MLflow, exactly as a one-process worker. Each trial it wraps in
optuna-integration's ``TorchDistributedTrial``, which broadcasts the sampled parameters, the
reported values and the pruning decisions to the other ranks. The other ranks (followers)
run the same trial body against ``TorchDistributedTrial(None)``: the same calls in the same
order, so every broadcast and every DDP gradient all-reduce has its partner. Before each
trial rank 0 broadcasts whether another one follows.
"""

from __future__ import annotations

import optuna
import torch.distributed as dist
from optuna_integration import TorchDistributedTrial

from fewshot.errors import UserError
from fewshot.hpo.targets import Target
from fewshot.hpo.trials import MODEL_ATTR, RUN_ATTR, TrialRunner

NEXT_TRIAL, DONE = "trial", "done"


def check_target(target: str, n_jobs: int, world: int) -> None:
    if world > 1 and target != "moco":
        raise UserError(
            f"--target {target}: only --target moco trains across torchrun processes; run it without torchrun"
        )
    if world > 1 and n_jobs != 1:
        raise UserError(f"--n-jobs {n_jobs}: under torchrun trials run one at a time across the processes; use 1")


def _announce(message: str) -> str:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LeaderObjective:
    """Rank 0's objective: announce the trial, then run ``runner`` on the broadcasting trial."""

    def __init__(self, runner: TrialRunner) -> None:
        self.runner = runner

    def __call__(self, trial) -> float:
        _announce(NEXT_TRIAL)
        return self.runner(TorchDistributedTrial(trial))

    @staticmethod
    def finish() -> None:
        _announce(DONE)


def follow(target: Target) -> int:
    """A follower's loop: mirror each trial rank 0 runs until it announces the end. Returns the trial count."""
    followed = 0
    while _announce("") == NEXT_TRIAL:
        _follow_trial(target, TorchDistributedTrial(None))
        followed += 1
    return followed


def _follow_trial(target: Target, trial: TorchDistributedTrial) -> None:
    """The calls ``TrialRunner`` makes on rank 0 that communicate, in its order."""
    trial.set_user_attr(RUN_ATTR, "")  # pairs with rank 0 recording its child run
    params = target.suggest(trial)

    def report(step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        outcome = target.evaluate(params, report, lambda metrics, step: None)
    except optuna.TrialPruned:
        return
    if outcome.model is not None:
        trial.set_user_attr(MODEL_ATTR, "")  # pairs with rank 0 recording the logged encoder
