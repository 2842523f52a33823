"""Semi-supervised fine-tuning (FixMatch-style) from a MoCo encoder, or from random weights.

python -m entrypoints.semisup                      # the champion MoCo encoder, CPU defaults
python -m entrypoints.semisup --init random        # the ablation: same network, random weights
python -m entrypoints.semisup --init ckpt.pt --steps 3000 --threshold flexmatch
"""

import click

from fewshot.cli import (
    FewshotCommand,
    _existing_dir,
    bool_option,
    debug_option,
    device_option,
    draw_options,
    name_in_path,
    output_dir,
    precision_option,
    seed_option,
)
from fewshot.models import ENCODERS
from fewshot.semisup import OPTIMIZERS, STRONG_PRESETS, TARGET_MODELS, THRESHOLDS, SemisupConfig
from fewshot.semisup.job import run_semisup

D = SemisupConfig()


@click.command(cls=FewshotCommand)
@click.option("--init", default=D.init, show_default=True,
              help="MoCo encoder: models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/encoder, a "
                   "moco_pretrain checkpoint; or 'random' (same network, random weights).")  # fmt: skip
@click.option("--arch", type=click.Choice(list(ENCODERS)), default=D.arch, show_default=True,
              help="Encoder for --init random (a pretrained encoder brings its own).")  # fmt: skip
@click.option("--width", type=int, default=D.width, show_default=True, help="Digit-encoder width for --init random.")
@click.option("--steps", type=click.IntRange(min=1), default=D.steps, show_default=True, help="Optimizer steps.")
@click.option("--epochs", type=click.FloatRange(min=0), default=D.epochs, show_default=True,
              help="Passes over the unlabeled pool instead of --steps (0: use --steps).")  # fmt: skip
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Labeled images per step.")
@click.option("--mu", type=int, default=D.mu, show_default=True, help="Unlabeled images per labeled image in a step.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=D.optimizer, show_default=True)
@click.option("--lr", type=float, default=D.lr, show_default=True, help="Peak learning rate (FixMatch cosine decay).")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--encoder-lr-ratio", type=float, default=D.encoder_lr_ratio, show_default=True,
              help="The encoder's learning rate is --lr times this.")  # fmt: skip
@click.option("--tau", type=float, default=D.tau, show_default=True, help="Confidence threshold of a pseudo-label.")
@click.option("--lambda-u", type=float, default=D.lambda_u, show_default=True, help="Weight of the unlabeled loss.")
@click.option("--threshold", type=click.Choice(THRESHOLDS), default=D.threshold, show_default=True,
              help="fixed: --tau for every class; flexmatch: per-class thresholds from each class's learning status.")  # fmt: skip
@bool_option("--dist-align", D.dist_align, "Align weak predictions with the labeled class distribution.")
@click.option("--graph-k", type=click.IntRange(0, 100), default=D.graph_k, show_default=True,
              help="Smooth each pseudo-label over its image's K nearest training images in the starting "
                   "encoder's embedding (CoMatch-style memory); 0: off.")  # fmt: skip
@click.option("--graph-alpha", type=click.FloatRange(0, 1, min_open=True), default=D.graph_alpha, show_default=True,
              help="Weight of the image's own prediction in a smoothed pseudo-label (the rest: its neighbours').")  # fmt: skip
@click.option("--targets", type=click.Choice(TARGET_MODELS), default=D.targets, show_default=True,
              help="Model that labels the weak views: the online model or its EMA.")  # fmt: skip
@click.option("--ema", type=float, default=D.ema, show_default=True,
              help="EMA decay of the evaluated (and logged) model; 0: the online model.")  # fmt: skip
@click.option("--bn-recalibration", type=click.IntRange(0, 60000), default=D.bn_recalibration, show_default=True,
              help="Clean pool images that re-estimate the scored model's batch-norm statistics (0: training's).")  # fmt: skip
@click.option("--strong", type=click.Choice(list(STRONG_PRESETS)), default=D.strong, show_default=True)
@click.option("--strong-strength", type=float, default=D.strong_strength, show_default=True)
@click.option("--weak-strength", type=float, default=D.weak_strength, show_default=True)
@click.option("--bar", type=click.FloatRange(0, 1), default=D.bar, show_default=True,
              help="Share of labeled and strong views given a short crossbar (crossed sevens and zeds).")  # fmt: skip
@bool_option(
    "--refit", D.refit, "Train on all 100 labels (the 25 validation images too); validation is then in-sample."
)
@bool_option("--head-warmup", D.head_warmup, "Start from a linear head fitted on the frozen encoder's features.")
@click.option("--eval-every", type=int, default=D.eval_every, show_default=True,
              help="Steps between evaluations (and checkpoints).")  # fmt: skip
@bool_option(
    "--eval-test", D.eval_test, "Also log test top-1 at every evaluation (monitoring only; nothing is chosen on it)."
)
@click.option("--tta-views", type=click.IntRange(0, 64), default=D.tta_views, show_default=True,
              help="Final test scores: mean softmax over the image and this many mildly warped copies (0: off).")  # fmt: skip
@seed_option()
@click.option("--data-dir", default="", callback=_existing_dir,
              help="Folder with the four MNIST IDX files; default $FEWSHOT_DATA_DIR, else ./data with download.")  # fmt: skip
@click.option("--labels-per-class", type=click.IntRange(min=2, max=1000), default=10, show_default=True)
@click.option("--n-labels", type=click.IntRange(min=0, max=30000), default=0, show_default=True,
              help="The report's plain random draw of N labeled images (0: use --labels-per-class).")  # fmt: skip
@click.option("--run-name", default="", callback=name_in_path,
              help="MLflow run name (and checkpoint folder: no / or ..).")  # fmt: skip
@click.option("--checkpoint-dir", default="", callback=output_dir,
              help="Checkpoints go to DIR/<run name>/last.pt (default checkpoints/semisup).")  # fmt: skip
@click.option("--resume", default="auto", show_default=True,
              help="auto: continue this run name's unfinished checkpoint if any; never: start fresh; or a checkpoint path.")  # fmt: skip
@bool_option("--register", True, "Register the classifier as a version of fewshot-classifier.")
@device_option()
@precision_option()
@bool_option("--progress", True, "Progress bar.")
@debug_option()
def main(**opts) -> None:
    draw = draw_options(opts)
    opts.pop("debug")
    run_name = opts.pop("run_name")
    checkpoint_dir = opts.pop("checkpoint_dir") or None
    resume = opts.pop("resume") or "auto"
    register = bool(opts.pop("register"))
    out = run_semisup(SemisupConfig(**opts, **draw), checkpoint_dir=checkpoint_dir, run_name=run_name,
                      resume=resume, register=register)  # fmt: skip
    registered = f"; registered version {out['version']} ({out['alias']})" if "version" in out else ""
    single = out.get("test_plain_top1")
    shown = (
        f"{single:.4f} single view, {out['test_top1']:.4f} with TTA"
        if single is not None
        else f"{out['test_top1']:.4f}"
    )
    click.echo(
        f"semisup: test top-1 {shown}, top-5 {out['test_top5']:.4f}, validation top-1 "
        f"{out['val_top1']:.4f}, mask rate {out['final_mask_rate']:.3f}, {out['train_seconds'] / 60:.1f} min of "
        f"training{registered} (run {out['run_id']})"
    )


if __name__ == "__main__":
    main()
