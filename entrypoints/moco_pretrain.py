"""MoCo v2 pretraining on the unlabeled pool; logs the encoder and (with --register) registers it.

One CPU or GPU: ``python -m entrypoints.moco_pretrain``. Several processes:
``torchrun --nproc_per_node 2 -m entrypoints.moco_pretrain ...`` (gloo on CPU, nccl on GPU).
"""

import click
import torch.distributed as dist

from fewshot.cli import FewshotCommand, bool_option, common_options, draw_options, output_dir
from fewshot.moco import POSITIVES
from fewshot.models import ENCODERS
from fewshot.pretrain import M_SCHEDULES, VIEW_PRESETS, PretrainConfig
from fewshot.pretrain.job import run_pretrain

DEFAULTS = PretrainConfig()


@click.command(cls=FewshotCommand)
@common_options(epochs=DEFAULTS.epochs, lr=DEFAULTS.lr, batch_size=DEFAULTS.batch_size)
@click.option("--arch", type=click.Choice(list(ENCODERS)), default=DEFAULTS.arch, show_default=True)
@click.option(
    "--width", type=int, default=DEFAULTS.width, show_default=True, help="Channel width of the digit encoder."
)
@click.option("--moco-k", type=int, default=DEFAULTS.moco_k, show_default=True, help="Queue size (negatives).")
@click.option("--moco-m", type=float, default=DEFAULTS.moco_m, show_default=True, help="Key-encoder momentum.")
@click.option("--m-schedule", type=click.Choice(M_SCHEDULES), default=DEFAULTS.m_schedule, show_default=True,
              help="cosine: momentum rises from --moco-m to 1 over the run.")  # fmt: skip
@click.option("--moco-t", type=float, default=DEFAULTS.moco_t, show_default=True, help="InfoNCE temperature.")
@click.option("--moco-dim", type=int, default=DEFAULTS.moco_dim, show_default=True, help="Projection dimension.")
@bool_option("--mlp", DEFAULTS.mlp, "2-layer MLP projection head (MoCo v2); false: one linear layer (v1).")
@bool_option("--symmetric", DEFAULTS.symmetric, "Symmetric loss (both views as queries; twice the cost per image).")
@click.option("--positive", type=click.Choice(POSITIVES), default=DEFAULTS.positive, show_default=True,
              help="key: a query's positive is its own key; nearest: the queued keys most similar to it (NNCLR).")  # fmt: skip
@click.option("--nearest-k", type=int, default=DEFAULTS.nearest_k, show_default=True,
              help="With --positive nearest: how many of the closest queued keys are a query's positives.")  # fmt: skip
@click.option("--bn-splits", type=int, default=DEFAULTS.bn_splits, show_default=True,
              help="Split batch-norm groups on one process (blocks the BN leak; torchrun uses shuffle-BN).")  # fmt: skip
@click.option("--augment", type=click.Choice(list(VIEW_PRESETS)), default=DEFAULTS.augment, show_default=True)
@click.option("--augment-strength", type=float, default=DEFAULTS.augment_strength, show_default=True)
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True)
@click.option("--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs, show_default=True)
@bool_option("--knn-test", True, "Also report the kNN monitor on the 10,000 test images (never used to choose).")
@click.option("--checkpoint-dir", default="", callback=output_dir,
              help="Checkpoints go to DIR/<run name>/last.pt (default checkpoints/moco).")  # fmt: skip
@click.option("--checkpoint-minutes", type=float, default=DEFAULTS.checkpoint_minutes, show_default=True,
              help="Also checkpoint mid-epoch this often (0: only at epoch ends).")  # fmt: skip
@click.option("--resume", default="auto", show_default=True,
              help="auto: continue this run name's unfinished checkpoint if any; never: start fresh; or a checkpoint path.")  # fmt: skip
@bool_option("--register", False, "Register the encoder as a version of fewshot-moco-encoder.")
@bool_option("--progress", True, "Progress bar.")
def main(**opts) -> None:
    draw = draw_options(opts)
    opts.pop("debug")
    register = opts.pop("register")
    checkpoint_dir = opts.pop("checkpoint_dir") or None
    resume = opts.pop("resume") or "auto"
    run_name = opts.pop("run_name")
    cfg = PretrainConfig(**opts, **draw)
    try:
        out = run_pretrain(cfg, checkpoint_dir=checkpoint_dir, run_name=run_name, resume=resume, register=register)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if "run_id" in out:
        registered = f", registered version {out['version']} ({out['alias']})" if "version" in out else ""
        click.echo(
            f"moco: kNN val {out['final_knn_val_acc']:.4f}, leave-one-out kNN on the 100 labels {out['loo_knn_acc']:.4f}"
            f"{registered} (run {out['run_id']}, model {out['model_uri']})"
        )


if __name__ == "__main__":
    main()
