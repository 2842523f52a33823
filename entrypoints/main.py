"""The whole study in one command: baselines, MoCo, probes, a short search, and the report."""

import click

from fewshot.cli import FewshotCommand, precision_option
from fewshot.workflow import WorkflowConfig, run_workflow
from fewshot.workflow_steps import build_steps


@click.command(cls=FewshotCommand)
@click.option("--draws", type=click.IntRange(1, 20), default=3, show_default=True, help="Label draws (seeds seed..).")
@click.option("--quick", type=click.BOOL, default=False, show_default=True, help="A few-minute smoke profile.")
@click.option("--force", type=click.BOOL, default=False, show_default=True, help="Rerun steps that already finished.")
@click.option("--data-dir", default="", help="Folder with the MNIST IDX files (default $FEWSHOT_DATA_DIR or ./data).")
@click.option("--seed", type=int, default=0, show_default=True, help="First label draw; MoCo and search use it.")
@click.option("--results-dir", default="", help="Where results.md / results.csv go (default: the project root).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@precision_option()
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def main(draws: int, quick: bool, force: bool, data_dir: str, seed: int, results_dir: str, device: str,
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
