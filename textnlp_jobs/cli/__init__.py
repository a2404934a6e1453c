"""``textnlp-jobs``: one command for producers, workers and operators.

Each command group lives in its own module and registers itself on the root app in ``base``;
importing them here is what puts them on the command line.
"""

from __future__ import annotations

import logging
import os
import sys

from textnlp_jobs.cli import db, health, jobs, maintenance, models, services  # noqa: F401  (registers commands)
from textnlp_jobs.cli.base import app, console
from textnlp_jobs.errors import TextNLPError


def main() -> None:
    """Entry point of the ``textnlp-jobs`` script."""
    logging.basicConfig(level=os.environ.get("TEXTNLP_LOGLEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app()
    except TextNLPError as error:
        console.print(f"[red]error[/red] {error.code}: {error.message}", markup=True, highlight=False)
        sys.exit(2)


__all__ = ["app", "main"]
