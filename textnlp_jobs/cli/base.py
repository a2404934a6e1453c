"""The root Typer app, its command groups, and how every command writes.

Data goes to stdout (``console``, ``emit_json``): ids, tables, results, so ``ID=$(textnlp-jobs
submit ...)`` captures only the id. Everything else goes to stderr (``err_console``, ``say``):
progress bars, confirmations, warnings and errors. ``--json`` on a data command prints one JSON
document instead of a table. Errors are raised (``TextNLPError``, ``UsageError``) and printed in
one line by ``textnlp_jobs.cli.main``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.progress import Progress

from textnlp_jobs.display import progress_bar, to_jsonable
from textnlp_jobs.launcher import ensure_ledger

HELP = """``textnlp-jobs``: one command for producers, workers and operators.

Every option has an environment variable behind it (``TEXTNLP_*``, see settings.py). With no
settings at all everything runs embedded under ``~/.textnlp-jobs`` (SQLite + a folder broker).

Data goes to stdout, progress and messages to stderr. Exit status: 0 success; 1 a job did not
succeed (``wait``, ``submit --wait``) or ``check`` found a service down; 2 an error, printed as one
line ``error <code>: <message>``; 3 ``cancel`` of a job that had already finished.
"""

# Markdown: help comes from docstrings wrapped at the source's width; markdown reflows a paragraph
# to the terminal (the default mode keeps every source line break) and renders ``code`` as code.
MARKUP: Final = "markdown"
app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=MARKUP)


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=MARKUP)


db_app = _group("The ledger's schema (Alembic migrations).")
models_app = _group("The model store and registry.")
jobs_app = _group("Listings of jobs.")
maintenance_app = _group("Run maintenance tasks by hand.")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(maintenance_app, name="maintenance")

def _stdout_console() -> Console:
    # Piped output is read by programs: wide enough that no table ever cuts an id or a code.
    if sys.stdout.isatty():
        return Console()
    return Console(width=max(240, int(os.environ.get("COLUMNS", "0") or 0)))


console = _stdout_console()  # stdout: data only
# stderr: progress, messages, errors. Soft wrap: a message is one line the terminal wraps, never
# broken into lines at 80 columns when stderr is a log file or a pipe.
err_console = Console(stderr=True, soft_wrap=True)
log = logging.getLogger(__name__)

# The `--json` option every data command takes.
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]


@dataclass
class CliState:
    """Options of the root command that the error handler in ``main`` reads."""

    debug: bool = False


state = CliState()


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", envvar="TEXTNLP_DEBUG",
                                             help="Print full tracebacks of unexpected errors.")] = False) -> None:
    state.debug = debug


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def say(message: str) -> None:
    """A message for the person at the terminal (stderr), never part of a command's data."""
    err_console.print(message, markup=False, highlight=False)


def emit_json(data: Any) -> None:
    """One JSON document on stdout (datetimes as ISO 8601, ids as strings)."""
    sys.stdout.write(json.dumps(to_jsonable(data), ensure_ascii=False, indent=None) + "\n")
    sys.stdout.flush()


def emit(data: Any, *, as_json: bool, render: Any = None) -> None:
    """``data`` as JSON with ``--json``, else ``render`` (a rich renderable, default: ``data``) on stdout."""
    if as_json:
        emit_json(data)
    else:
        console.print(data if render is None else render)


def progress() -> Progress:
    """A progress bar on stderr; silent when stderr is not a terminal (logs, CI, pipes)."""
    bar = progress_bar(err_console)
    bar.disable = not err_console.is_terminal
    return bar


__all__ = ["JsonOption", "app", "console", "db_app", "emit", "emit_json", "ensure_ledger", "err_console",
           "jobs_app", "maintenance_app", "models_app", "progress", "say", "state", "stdout_is_terminal"]
