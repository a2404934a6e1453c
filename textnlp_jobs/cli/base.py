"""The root Typer app, its command groups and the console every command writes to."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from textnlp_jobs.settings import Settings

HELP = """``textnlp-jobs``: one command for producers, workers and operators.

Every option has an environment variable behind it (``TEXTNLP_*``, see settings.py). With no
settings at all everything runs embedded under ``~/.textnlp-jobs`` (SQLite + a folder broker).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="The ledger's schema (Alembic migrations).", no_args_is_help=True)
models_app = typer.Typer(help="The model store and registry.", no_args_is_help=True)
jobs_app = typer.Typer(help="Listings of jobs.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Run maintenance tasks by hand.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(maintenance_app, name="maintenance")

console = Console()
log = logging.getLogger(__name__)


def ensure_ledger(settings: Settings) -> None:
    """The embedded ledger migrates itself on first use; PostgreSQL waits for `db upgrade`
    (a schema behind the code is one line, ``db.not_migrated``, not a traceback)."""
    if settings.database_url is None:
        from textnlp_jobs.db.migrate import upgrade

        upgrade(settings.database_url_value())
    else:
        from textnlp_jobs.db.health import require_current_schema

        require_current_schema(settings)
