"""The ``lowbit`` command: thin wrappers that parse, call the library and print.

Exit codes: 0 ok, 2 bad input (a one-line message), 1 failure, 143 terminated (SIGTERM).

Start-up stays light: this package and the command modules import typer, rich and
lowbit.errors only; torch, transformers and the rest are imported inside the commands that
need them, so ``lowbit --help`` and ``lowbit formats`` start in a fraction of a second.
"""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lowbit: quantize PyTorch models (formats, PTQ, export).")
# wide enough for tables when the output is a pipe or a CI log (rich would assume 80)
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

# Library messages name Python keywords; on the command line the user knows the flags. Each
# pattern maps to the text the CLI shows; it is applied only when the running command has the
# flag (the replacement's first word), so no message points at a flag that is not there.
KEYWORD_FLAGS: dict[str, str] = {
    r"\ballow_requantize=True": "--allow-requantize",
    r"\btokenizer=None": "--no-vocab",
    r"\bresume=False(?: \(CLI: --restart\))?": "--no-resume",
    r"\bforward_loop= or calib_data=": "--calib TEXT_FILE",
    r"\bseq_len=": "--seq-len ",
    r"\bseq_len\b": "--seq-len",
    r"\bn_samples\b": "--samples",
}


@app.callback()
def _root() -> None:
    """lowbit: quantize PyTorch models (formats, PTQ, export)."""


def _command_flags() -> set[str]:
    """Every option name of the command being run (empty outside a command)."""
    try:  # typer >= 0.20 runs on its own copy of click
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return set()
    return {o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)}


def cli_message(msg: str, flags: set[str] | None = None) -> str:
    """``msg`` with the Python keywords of :data:`KEYWORD_FLAGS` replaced by the flags of the
    running command (``flags``: the option names that may be named; default: the command's)."""
    flags = _command_flags() if flags is None else flags
    for pattern, repl in KEYWORD_FLAGS.items():
        if repl.split()[0] in flags:
            msg = re.sub(pattern, repl, msg)
    return msg


def fail(msg: str, code: int = 2) -> None:
    """Print one clear line to stderr and exit with ``code`` (2: bad input)."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def one_line_errors(what: str):
    """Library errors exit 2 (bad input), anything else exits 1 ("WHAT failed: ..."), each
    with one line instead of a traceback; Python keywords in the message become the flags."""
    try:
        yield
    except LowbitError as e:
        fail(cli_message(str(e)))
    except typer.Exit:
        raise
    except Exception as e:  # a real failure: say so in one line, exit 1
        fail(cli_message(f"{what} failed: {type(e).__name__}: {e}"), code=1)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C does, so ``finally`` blocks and atomic_dir's cleanup run
    (no ``.out.*.tmp`` folder is left); a second SIGTERM during that cleanup is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` (SIGINT already raises KeyboardInterrupt)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


from lowbit.cli import (  # noqa: E402,F401  (registers commands)
    advice_cmds, export_cmd, formats_cmd, generate_cmd, ptq_cmds, quantize_cmds)


def main() -> None:
    """Entry point of the ``lowbit`` script."""
    install_signal_handlers()
    try:
        app()
    except LowbitError as e:  # a library error that escaped a command: bad input
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
