"""Probe a pretrained encoder on the labeled draw: linear protocol, weighted kNN or fine-tuning."""

import click

from fewshot.cli import FewshotCommand, bool_option, common_options, draw_options, fit_options
from fewshot.embedding import METHODS as EMBEDDINGS
from fewshot.encoder_source import DEFAULT_ENCODER
from fewshot.linear_eval import AUGMENT_CHOICES, LinearEvalConfig, run_linear_eval
from fewshot.probe import DEFAULT_FEATURE_GRID, PROBES
from fewshot.train import OPTIMIZERS, FitConfig


@click.command(cls=FewshotCommand)
@common_options(epochs=1000, lr=3e-3, batch_size=75)
@click.option(
    "--encoder",
    default=DEFAULT_ENCODER,
    show_default=True,
    help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/encoder, or a moco_pretrain checkpoint file.",
)
@click.option("--probe", type=click.Choice(list(PROBES)), default="linear", show_default=True)
@fit_options(list(OPTIMIZERS))
@bool_option(
    "--standardize", True, "Standardise features with the training images' mean and std (folded into the logged head)."
)
@click.option(
    "--augment",
    type=click.Choice(AUGMENT_CHOICES),
    default="auto",
    show_default=True,
    help="Augment the labeled images every step: online (a mild random affine) or strong (larger affine, elastic, "
    "pen width, cutout, crossbars); auto: strong for finetune, none for linear and knn.",
)
@click.option("--augment-strength", type=click.FloatRange(0, 3), default=1.0, show_default=True)
@click.option("--bar", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Strong augmentation: share of images given a short crossbar (crossed sevens and zeds).")  # fmt: skip
@click.option("--tta-views", type=click.IntRange(0, 64), default=8, show_default=True,
              help="Fine-tuning: test predictions average the image and this many mildly warped copies "
              "(as the CNN baseline's); 0: off. test_plain_top1 is logged beside.")  # fmt: skip
@click.option("--knn-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--knn-temperature", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option(
    "--encoder-lr-ratio",
    type=click.FloatRange(min=0, min_open=True, max=10),
    default=0.1,
    show_default=True,
    help="Fine-tuning: the encoder's learning rate is --lr times this.",
)
@click.option(
    "--feature-grid",
    type=click.IntRange(1, 4),
    default=DEFAULT_FEATURE_GRID,
    show_default=True,
    help="Frozen probes read the encoder's last feature map average-pooled to this grid (2: 4x the values of 1).",
)
@click.option(
    "--feature-maps",
    type=click.Choice(["auto", "1", "2"]),
    default="auto",
    show_default=True,
    help="Frozen probes read the last map (1), or also the map before the last down-sampling (2; digit encoder); "
    "auto: 2 for the linear probe on the digit encoder, else 1.",
)
@bool_option(
    "--refit", True, "Linear probe: after early stopping on the 25 validation labels, train a fresh head on all 100."
)
@bool_option(
    "--normalize", True, "Linear and fine-tuning heads: L2-normalise the features first (kept in the logged head)."
)
@click.option(
    "--embedding",
    type=click.Choice(EMBEDDINGS),
    default="pca",
    show_default=True,
    help="2-D picture of the test features coloured by digit.",
)
def main(**opts) -> None:
    draw = draw_options(opts)
    opts.pop("debug")
    fit = FitConfig(
        optimizer=opts.pop("optimizer"), lr=opts.pop("lr"), weight_decay=opts.pop("weight_decay"),
        batch_size=opts.pop("batch_size"), epochs=opts.pop("epochs"), patience=opts.pop("patience"),
        schedule=opts.pop("schedule"),
    )  # fmt: skip
    maps = opts.pop("feature_maps")
    cfg = LinearEvalConfig(**opts, **draw, feature_maps=None if maps == "auto" else int(maps), fit=fit)
    result = run_linear_eval(cfg)
    click.echo(
        f"{result['probe']} probe: test top-1 {result['test_top1']:.4f}, top-5 {result['test_top5']:.4f}, "
        f"validation top-1 {result['val_top1']:.4f}; head trained in {result['head_seconds']:.2f} s (run {result['run_id']})"
    )


if __name__ == "__main__":
    main()
