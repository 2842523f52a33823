"""Shared pieces of the click entry points: common options, boolean options that ``mlflow run``
can pass (``--name true|false``), checks of strings that become paths, and one-line errors."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from fewshot.device import PRECISIONS
from fewshot.errors import UserError
from fewshot.safe_paths import path_component, writable_dir
from fewshot.train import SCHEDULES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
FALSE_WORDS = ("false", "0", "no", "off", "f", "n")
SEED = click.IntRange(0, 2**32 - 1)  # what torch and numpy seeding accept
DEVICES = ["auto", "cpu", "cuda"]


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class FewshotCommand(click.Command):
    """A click command whose user errors print one line (``error: ...``) and exit 2.

    ``--debug`` shows the traceback instead. SIGTERM is handled like Ctrl-C so runs end
    as KILLED rather than staying RUNNING.
    """

    def main(self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = _debug_requested(argv)
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


def _debug_requested(argv: list[str]) -> bool:
    """``--debug`` or ``--debug true`` (``mlflow run`` passes a value), not ``--debug false``."""
    if "--debug" not in argv:
        return False
    following = argv[argv.index("--debug") + 1 : argv.index("--debug") + 2]
    return not (following and following[0].lower() in FALSE_WORDS)


def bool_option(name: str, default: bool, help_text: str = "") -> Callable:
    """A boolean option: ``--name`` alone or ``--name true|false`` (how ``mlflow run`` passes
    it); ``--no-name`` is the same as ``--name false``."""
    dest = name.lstrip("-").replace("-", "_")
    negated = f"fewshot.negated.{dest}"

    def remember_negation(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.meta[negated] = True

    def resolve(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        return False if ctx.meta.get(negated) else bool(value)

    def decorate(fn: Callable) -> Callable:
        # eager: the negation is seen before --name's own value is resolved
        fn = click.option(f"--no-{name.lstrip('-')}", is_flag=True, expose_value=False, is_eager=True,
                          callback=remember_negation, help=f"Same as {name} false.")(fn)  # fmt: skip
        return click.option(name, dest, type=click.BOOL, is_flag=False, flag_value=True, default=default,
                            show_default=True, callback=resolve, help=help_text)(fn)  # fmt: skip

    return decorate


def debug_option() -> Callable:
    return bool_option("--debug", False, "Show tracebacks for user errors.")


def seed_option(help_text: str = "Seed of the label draw and the training.") -> Callable:
    return click.option("--seed", type=SEED, default=0, show_default=True, help=help_text)


def device_option() -> Callable:
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)


PRECISION_HELP = (
    "auto: bf16 autocast (channels-last) where the device computes bf16 natively (CPU with AMX or "
    "AVX-512 BF16, CUDA), else fp32; fp32 or bf16 force one. Losses, MoCo queue and EMA stay fp32."
)


def precision_option() -> Callable:
    return click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                        help=PRECISION_HELP)  # fmt: skip


def _user_error_as_bad_parameter(check: Callable[[str, str], str], ctx: click.Context, param: click.Parameter,
                                 value: Any) -> Any:  # fmt: skip
    if value in ("", None):
        return None
    try:
        return check(param.opts[0], str(value))
    except UserError as exc:
        raise click.UsageError(str(exc), ctx) from exc


def name_in_path(ctx: click.Context, param: click.Parameter, value: Any) -> str | None:
    """Callback: a name that becomes one folder name (run names); empty means None."""
    return _user_error_as_bad_parameter(path_component, ctx, param, value)


def output_dir(ctx: click.Context, param: click.Parameter, value: Any) -> str | None:
    """Callback: an output folder, created if missing, that must be writable; empty means None."""
    return _user_error_as_bad_parameter(writable_dir, ctx, param, value)


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


def common_options(epochs: int, lr: float, batch_size: int) -> Callable:
    """Options every entry point shares: seed, data, labels, budget, run name, device, precision, debug."""

    def decorate(fn: Callable) -> Callable:
        options = [
            seed_option(),
            click.option("--data-dir", default="", callback=_existing_dir,
                         help="Folder with the four MNIST IDX files (gz or raw); default $FEWSHOT_DATA_DIR, else ./data with download."),
            click.option("--labels-per-class", type=click.IntRange(min=2, max=1000), default=10, show_default=True,
                         help="Balanced draw: labeled images per digit (10 gives the 100 labels)."),
            click.option("--n-labels", type=click.IntRange(min=0, max=30000), default=0, show_default=True,
                         help="The report's plain random draw of N labeled images (0: use --labels-per-class)."),
            click.option("--epochs", type=click.IntRange(min=1, max=100000), default=epochs, show_default=True),
            click.option("--lr", type=click.FloatRange(min=0, min_open=True, max=10), default=lr, show_default=True),
            click.option("--batch-size", type=click.IntRange(min=1, max=65536), default=batch_size, show_default=True),
            click.option("--run-name", default="", callback=name_in_path,
                         help="MLflow run name (also a folder name: no / or ..)."),
            device_option(),
            precision_option(),
            debug_option(),
        ]  # fmt: skip
        return _apply(options, fn)

    return decorate


def fit_options(optimizers: Sequence[str]) -> Callable:
    """The training loop's options shared by ``baseline`` and ``linear_eval``."""

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
