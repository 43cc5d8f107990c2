"""The ``lowbit`` command: thin wrappers that parse, call the library and print.

Exit codes: 0 ok, 2 bad input (a one-line message), 1 failure.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from rich.console import Console

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lowbit: quantize PyTorch models (formats, PTQ, export).")
# wide enough for tables when the output is a pipe or a CI log (rich would assume 80)
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


@app.callback()
def _root() -> None:
    """lowbit: quantize PyTorch models (formats, PTQ, export)."""


def fail(msg: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit with ``code`` (2: bad input)."""
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def one_line_errors(what: str):
    """Library errors exit 2 (bad input), anything else exits 1 ("``what`` failed: ..."),
    each with one line instead of a traceback."""
    try:
        yield
    except LowbitError as e:
        fail(str(e))
    except typer.Exit:
        raise
    except Exception as e:  # a real failure: say so in one line, exit 1
        fail(f"{what} failed: {type(e).__name__}: {e}", code=1)


from lowbit.cli import (  # noqa: E402,F401  (registers commands)
    advice_cmds, export_cmd, formats_cmd, generate_cmd, ptq_cmds, quantize_cmds)


def main() -> None:
    """Entry point of the ``lowbit`` script."""
    try:
        app()
    except LowbitError as e:  # a library error that escaped a command: bad input
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
