"""The whole study in one command: baselines, MoCo, probes, a short search, and the report."""

import click

from fewshot.cli import (
    FewshotCommand,
    _existing_dir,
    bool_option,
    debug_option,
    device_option,
    output_dir,
    precision_option,
    seed_option,
)
from fewshot.workflow import WorkflowConfig, run_workflow
from fewshot.workflow_steps import build_steps


@click.command(cls=FewshotCommand)
@click.option("--draws", type=click.IntRange(1, 20), default=3, show_default=True, help="Label draws (seeds seed..).")
@bool_option("--quick", False, "A few-minute smoke profile.")
@bool_option("--force", False, "Rerun steps that already finished.")
@click.option("--data-dir", default="", callback=_existing_dir,
              help="Folder with the MNIST IDX files (default $FEWSHOT_DATA_DIR or ./data).")  # fmt: skip
@seed_option("First label draw; MoCo and search use it.")
@click.option("--results-dir", default="", callback=output_dir,
              help="Where results.md / results.csv go (default: the project root).")  # fmt: skip
@device_option()
@precision_option()
@debug_option()
def main(draws: int, quick: bool, force: bool, data_dir: str | None, seed: int, results_dir: str | None, device: str,
         precision: str, debug: bool) -> None:  # fmt: skip
    cfg = WorkflowConfig(
        draws=draws, quick=quick, force=force, data_dir=data_dir or None, seed=seed,
        results_dir=results_dir or None, device=device, precision=precision,
    )  # fmt: skip
    result = run_workflow(cfg, build_steps, echo=lambda line: click.echo(line, err=True))
    click.echo(result.markdown)
    click.echo(f"wrote {result.report_path} (workflow run {result.run_id}; {len(result.reused)} steps reused)")


if __name__ == "__main__":
    main()
