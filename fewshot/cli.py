"""Shared pieces of the click entry points: common options and one-line errors."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from fewshot.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class FewshotCommand(click.Command):
    """A click command whose user errors print one line (``error: ...``) and exit 2.

    ``--debug`` shows the traceback instead. SIGTERM is handled like Ctrl-C so runs end
    as KILLED rather than staying RUNNING.
    """

    def main(self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            result = super().main(argv, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except UserError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except (KeyboardInterrupt, click.Abort):
            click.echo("interrupted: the run was marked KILLED; rerun the same command to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if isinstance(result, int) and result != 0:
            sys.exit(result)
        return result


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _empty_to_none(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    return None if value in ("", None) else value


def _existing_dir(ctx: click.Context, param: click.Parameter, value: Any) -> str | None:
    if value in ("", None):
        return None
    try:
        is_dir = Path(value).is_dir()
    except OSError as exc:  # a parent folder this user may not enter
        raise click.BadParameter(
            f"{value} cannot be reached ({exc.strerror}); make it readable or use another copy"
        ) from exc
    if not is_dir:
        raise click.BadParameter(f"{value} is not a directory; point it at a folder holding the MNIST IDX files")
    return str(value)


PRECISION_HELP = (
    "auto: bf16 autocast (channels-last) where the device computes bf16 natively (CPU with AMX or "
    "AVX-512 BF16, CUDA), else fp32; fp32 or bf16 force one. Losses, MoCo queue and EMA stay fp32."
)


def precision_option() -> Callable:
    from fewshot.device import PRECISIONS

    return click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                        help=PRECISION_HELP)  # fmt: skip


def common_options(epochs: int, lr: float, batch_size: int) -> Callable:
    """Options every entry point shares: seed, data, labels, budget, run name, debug."""

    def decorate(fn: Callable) -> Callable:
        options = [
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of the label draw and the training."),
            click.option("--data-dir", default="", callback=_existing_dir,
                         help="Folder with the four MNIST IDX files (gz or raw); default $FEWSHOT_DATA_DIR, else ./data with download."),
            click.option("--labels-per-class", type=click.IntRange(min=2, max=1000), default=10, show_default=True,
                         help="Balanced draw: labeled images per digit (10 gives the 100 labels)."),
            click.option("--n-labels", type=click.IntRange(min=0, max=30000), default=0, show_default=True,
                         help="The report's plain random draw of N labeled images (0: use --labels-per-class)."),
            click.option("--epochs", type=click.IntRange(min=1, max=100000), default=epochs, show_default=True),
            click.option("--lr", type=click.FloatRange(min=0, min_open=True, max=10), default=lr, show_default=True),
            click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=batch_size, show_default=True),
            click.option("--run-name", default="", callback=_empty_to_none, help="MLflow run name."),
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
            precision_option(),
            click.option("--debug", is_flag=True, help="Show tracebacks for user errors."),
        ]  # fmt: skip
        return _apply(options, fn)

    return decorate


def fit_options(optimizers: Sequence[str]) -> Callable:
    """The training loop's options shared by ``baseline`` and ``linear_eval``."""
    from fewshot.train import SCHEDULES

    def decorate(fn: Callable) -> Callable:
        options = [
            click.option("--optimizer", type=click.Choice(list(optimizers)), default="adamw", show_default=True),
            click.option("--weight-decay", type=click.FloatRange(min=0, max=1), default=1e-4, show_default=True),
            click.option("--schedule", type=click.Choice(SCHEDULES), default="onecycle", show_default=True),
            click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Epochs without validation-loss improvement before stopping (0: train all epochs, "
                              "keep the best)."),
        ]  # fmt: skip
        return _apply(options, fn)

    return decorate


def _apply(options: list[Callable], fn: Callable) -> Callable:
    for option in reversed(options):
        fn = option(fn)
    return fn


def draw_options(opts: dict[str, Any]) -> dict[str, Any]:
    """labels_per_class / n_labels as the data module takes them."""
    n_labels = opts.pop("n_labels", 0) or None
    labels_per_class = opts.pop("labels_per_class")
    return {"labels_per_class": None if n_labels else labels_per_class, "n_labels": n_labels}
