"""Hyperparameter search with Optuna (targets linear, moco, baseline), tracked in MLflow.

Start the same command with the same --study-name in several terminals or machines to run
workers in parallel; rerun it to resume. --n-trials 0 only creates the study and the stores.
``torchrun --nproc_per_node 2 -m entrypoints.hpo --target moco ...`` trains each MoCo trial on
every process (rank 0 owns the study and the MLflow runs).
"""

import click
import torch.distributed as dist

from fewshot.cli import (
    FewshotCommand,
    _empty_to_none,
    _existing_dir,
    debug_option,
    device_option,
    precision_option,
    seed_option,
)
from fewshot.encoder_source import DEFAULT_ENCODER
from fewshot.hpo import PRUNERS, TARGETS, HpoConfig, run_hpo


@click.command(cls=FewshotCommand)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default="linear",
    show_default=True,
    help="linear: a head on a fixed encoder; moco: pretraining; baseline: the supervised CNN; "
    "semisup: semi-supervised training from --encoder.",
)
@click.option(
    "--n-trials",
    type=click.IntRange(0, 100000),
    default=20,
    show_default=True,
    help="Finished (complete or pruned) trials the study should hold, all workers together; 0: create it only.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Stop this worker after this many seconds (0: no limit).",
)
@click.option("--n-jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Trials in parallel threads.")
@click.option(
    "--study-name",
    default="",
    callback=_empty_to_none,
    help="Resume or join this study (default: a fresh hpo-<target>-<time> name).",
)
@click.option(
    "--storage",
    default="",
    callback=_empty_to_none,
    help="Optuna storage: sqlite:///f.db, postgresql://user@host/db, journal:///f.log "
    "(default: optuna.db beside the MLflow store).",
)
@click.option(
    "--folds",
    type=click.IntRange(0, 20),
    default=5,
    show_default=True,
    help="Stratified folds over the labeled images (0: the 75/25 validation split).",
)
@seed_option("Label draw, training seed and sampler seed.")
@click.option("--data-dir", default="", callback=_existing_dir, help="Folder with the MNIST IDX files.")
@click.option("--encoder", default=DEFAULT_ENCODER, show_default=True,
              help="Encoder URI for --target linear and semisup (semisup also takes random).")  # fmt: skip
@click.option(
    "--budget",
    default="",
    help="Per trial: epochs (3, 3ep) or, for moco, minutes (2min); semisup: training steps per fold. "
    "Default: linear 100, moco 3, baseline 150 epochs, semisup 300 steps.",
)
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True)
@click.option("--labels-per-class", type=click.IntRange(min=2, max=1000), default=10, show_default=True)
@click.option(
    "--heartbeat",
    "heartbeat_seconds",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Seconds between trial heartbeats; a trial silent for 3x this long is failed and retried.",
)
@device_option()
@precision_option()
@debug_option()
def main(**opts) -> None:  # fmt: skip
    opts.pop("debug")
    try:
        result = run_hpo(HpoConfig(**opts), echo=click.echo)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if result.follower:  # under torchrun rank 0 reports
        return
    click.echo(
        f"study {result.study_name}: {result.trials_run} trials run here, states {result.states}"
        + (f"; parent run {result.parent_run_id}" if result.parent_run_id else "")
    )


if __name__ == "__main__":
    main()
