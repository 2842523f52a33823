"""optuna-dashboard on the study storage (``make dashboard``).

    python -m fewshot.hpo.dashboard                       # the default storage, http://127.0.0.1:8080
    python -m fewshot.hpo.dashboard --storage journal:///path/study.log --port 8081

The storage is opened by ``open_storage``, so every URL ``hpo --storage`` takes works here
(``journal:///`` included) and the journal file is locked as every other client locks it.
optuna-dashboard is a development dependency (``pip install optuna-dashboard``).
"""

from __future__ import annotations

import click

from fewshot import tracking
from fewshot.cli import FewshotCommand, debug_option
from fewshot.errors import UserError
from fewshot.hpo import storage as st


@click.command(cls=FewshotCommand)
@click.option("--storage", default="", help="Optuna storage URL (default: the one hpo uses).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@debug_option()
def main(storage: str, host: str, port: int, debug: bool) -> None:
    try:
        import optuna_dashboard
    except ImportError as exc:
        raise UserError("optuna-dashboard is not installed; pip install optuna-dashboard (a dev dependency)") from exc
    url = storage or st.default_storage_url()
    opened = st.open_storage(url)
    click.echo(f"optuna-dashboard on {st.describe(url)} storage {tracking.redact(url)}: http://{host}:{port}/",
               err=True)  # fmt: skip
    optuna_dashboard.run_server(opened, host=host, port=port)


if __name__ == "__main__":
    main()
