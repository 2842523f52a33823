"""Supervised baseline (MLP1, MLP2 or the report's CNN) on the labeled draw."""

import click

from fewshot.augment import AUGMENT_CHOICES
from fewshot.baseline import BaselineConfig, run_baseline
from fewshot.cli import FewshotCommand, bool_option, common_options, draw_options, fit_options, output_dir
from fewshot.models import CLASSIFIERS
from fewshot.train import OPTIMIZERS, FitConfig


@click.command(cls=FewshotCommand)
@common_options(epochs=1000, lr=3e-3, batch_size=100)
@click.option("--model", type=click.Choice(list(CLASSIFIERS)), default="cnn", show_default=True)
@click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default="online", show_default=True)
@click.option("--augment-strength", type=click.FloatRange(0, 3), default=1.0, show_default=True)
@fit_options([o for o in OPTIMIZERS if o != "lbfgs"])
@click.option("--min-delta", type=click.FloatRange(min=0), default=0.0, show_default=True)
@bool_option(
    "--refit", True, "After early stopping on the 75/25 split, retrain on all labeled images for as many epochs."
)
@click.option(
    "--tta-views",
    type=click.IntRange(0, 64),
    default=8,
    show_default=True,
    help="Test-time augmentation: average the test prediction over the image and this many mildly warped copies.",
)
@click.option("--checkpoint-dir", default="", callback=output_dir, help="Also keep the best checkpoint in this folder.")
def main(**opts) -> None:
    draw = draw_options(opts)
    opts.pop("debug")
    fit = FitConfig(
        optimizer=opts.pop("optimizer"), lr=opts.pop("lr"), weight_decay=opts.pop("weight_decay"),
        batch_size=opts.pop("batch_size"), epochs=opts.pop("epochs"), patience=opts.pop("patience"),
        min_delta=opts.pop("min_delta"), schedule=opts.pop("schedule"),
    )  # fmt: skip
    checkpoint_dir = opts.pop("checkpoint_dir") or None
    result = run_baseline(BaselineConfig(**opts, **draw, fit=fit), checkpoint_dir=checkpoint_dir)
    click.echo(f"{opts['model']}: test top-1 {result['test_top1']:.4f}, validation top-1 {result['val_top1']:.4f} "
               f"(run {result['run_id']})")  # fmt: skip


if __name__ == "__main__":
    main()
