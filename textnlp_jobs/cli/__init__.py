"""``textnlp-jobs``: one command for producers, workers and operators.

Each command group lives in its own module and registers itself on the root app in ``base``;
importing them here is what puts them on the command line. ``main`` is where every error ends:
one line on stderr, ``error <code>: <message>``, exit status 2 (or the error's own).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from typer import Abort
from typer._click.exceptions import NoArgsIsHelpError

from textnlp_jobs.cli import db, jobs, maintenance, models, services  # noqa: F401  (registers commands)
from textnlp_jobs.cli.base import app, console, err_console, state
from textnlp_jobs.cli.failures import expected, save_traceback
from textnlp_jobs.errors import ErrorCode

ERROR_EXIT = 2


def _print_error(code: str, message: str) -> None:
    err_console.print(f"[red]error[/red] {code}: {message}", markup=True, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``textnlp-jobs`` script."""
    logging.basicConfig(level=os.environ.get("TEXTNLP_LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        status = app(standalone_mode=False)
    except NoArgsIsHelpError as error:
        console.print(error.format_message(), markup=False, highlight=False)
        sys.exit(ERROR_EXIT)
    except Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        known = expected(error)
        if known is not None:
            if state.debug:
                traceback.print_exception(error, file=sys.stderr)
            _print_error(known.code, known.message.replace("\n", " "))
            sys.exit(getattr(known, "exit_status", ERROR_EXIT))
        if state.debug:
            traceback.print_exception(error, file=sys.stderr)
            _print_error(ErrorCode.UNEXPECTED, f"{type(error).__name__}: {error}")
        else:
            where = save_traceback(error)
            detail = f"full traceback in {where}" if where else "no traceback file could be written"
            summary = str(error).splitlines()[0] if str(error) else ""
            _print_error(ErrorCode.UNEXPECTED, f"{type(error).__name__}: {summary} ({detail}; --debug prints it)")
        sys.exit(ERROR_EXIT)
    sys.exit(status if isinstance(status, int) else 0)


__all__ = ["app", "main"]
