"""The typer app and the entry point that turns library errors into exit codes.

Exit codes: 0 success; 2 usage and input errors (bad spec, file, position, g, size, an
existing output); 1 other failures. Expected failures print one line on stderr and no
traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import sys

import click
import typer

from ..errors import UlsamError
from . import bench, count, inject, stages
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


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
) -> None:
    """Options for every command come before the command name (e.g. --debug)."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit with 0, 1 (failure) or 2 (usage or input error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the command.
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    try:
        code = app(args=args, prog_name="ulsam-inject", standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UlsamError as error:
        if debug:
            raise
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as error:
        if debug:
            raise
        message = str(error).strip().splitlines()
        first = message[0] if message else ""
        err_console.print(
            f"error: unexpected {type(error).__name__}: {first} (run with --debug for details)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
