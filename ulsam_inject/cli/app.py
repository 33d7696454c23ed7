"""The typer app and the entry point that turns library errors into exit codes.

Exit codes: 0 success; 2 usage and input errors (bad spec, file, position, g, size, an
existing output, a malformed command line); 1 other failures. Expected failures print one
line on stderr and no traceback unless ``--debug`` is given (which prints the traceback
first and keeps the exit code).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any, NoReturn

import typer

from ulsam_inject.errors import UlsamError, first_line

from . import bench, count, evaluate, explain, finetune, inject, stages, sweep
from .common import err_console

app = typer.Typer(
    name="ulsam-inject",
    help="Retrofit ULSAM attention into compact CNNs: find stages, inject, count, time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("stages")(stages.stages)
app.command("inject")(inject.inject)
app.command("count")(count.count)
app.command("bench")(bench.bench)
app.command("finetune")(finetune.finetune)
app.command("evaluate")(evaluate.evaluate)
app.command("explain")(explain.explain)
app.command("sweep")(sweep.sweep)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
) -> None:
    """Options for every command come before the command name (e.g. --debug)."""


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(ClickException classes, Abort classes) of click and of typer's vendored copy.

    typer >= 0.20 vendors click as ``typer._click`` and raises its own classes; older
    versions raise click's. Both are caught, whichever is installed.
    """
    errors: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attribute, found in (("ClickException", errors), ("Abort", aborts)):
            cls = getattr(module, attribute, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(errors), tuple(aborts)


def _fail(message: str, code: int) -> NoReturn:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def _usage_message(error: Any) -> str:
    """A click usage error in one line, with where to find help."""
    text = error.format_message()
    ctx = getattr(error, "ctx", None)
    command = getattr(ctx, "command_path", None) or "ulsam-inject"
    return f"error: {text} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with 0, 1 (failure) or 2 (usage or input error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    click_errors, aborts = _click_exceptions()
    try:
        code = app(args=args, prog_name="ulsam-inject", standalone_mode=False)
    except UlsamError as error:
        if debug:
            traceback.print_exc()
        _fail(f"error: {error}", error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): stop quietly, and keep Python
        # from failing again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except Exception as error:
        if isinstance(error, aborts):
            _fail("aborted", 1)
        if isinstance(error, click_errors):
            exit_code = int(getattr(error, "exit_code", 2))
            if type(error).__name__ == "NoArgsIsHelpError":
                error.show()  # type: ignore[attr-defined]  # the help text, as asked
                sys.exit(exit_code)
            if debug:
                traceback.print_exc()
            if hasattr(error, "ctx"):  # a UsageError: bad command line
                _fail(_usage_message(error), exit_code)
            _fail(f"error: {error.format_message()}", exit_code)  # type: ignore[attr-defined]
        if debug:
            traceback.print_exc()
        first = first_line(error, limit=240)
        _fail(
            f"error: unexpected {type(error).__name__}: {first} (run with --debug for details)", 1
        )
    sys.exit(code if isinstance(code, int) else 0)
