"""Write results.md / results.csv (and the bar chart and confusion grid) from logged runs."""

from pathlib import Path

import click

from fewshot import report, tracking
from fewshot.cli import FewshotCommand, debug_option, output_dir


@click.command(cls=FewshotCommand)
@click.option("--parent-run-id", default="", help="The workflow run to report (default: the newest workflow run).")
@click.option("--out-dir", default="", callback=output_dir,
              help="Where results.md and results.csv go (default: the project root).")  # fmt: skip
@debug_option()
def main(parent_run_id: str, out_dir: str | None, debug: bool) -> None:
    tracking.configure()
    parent = parent_run_id or report.latest_workflow_run()
    built = report.build_report(report.step_run_ids(parent), title=f"fewshot results (workflow run {parent})")
    with tracking.start_run(run_name="report", tags={"job": "report", "source_workflow": parent}) as run:
        paths = report.write_report(built, Path(out_dir) if out_dir else tracking.PROJECT_ROOT, run)
    click.echo(built.markdown)
    click.echo(f"wrote {paths[0]} and {paths[1]} (report run {run.run_id})")


if __name__ == "__main__":
    main()
