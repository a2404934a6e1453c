"""``textnlp-jobs db``: the ledger's schema."""

from __future__ import annotations

from typing import Annotated

import typer

from textnlp_jobs.cli.base import db_app, say
from textnlp_jobs.settings import get_settings


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from textnlp_jobs.db.migrate import upgrade

    upgrade(get_settings().database_url_value(), revision)
    say(f"ledger at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Undo migrations down to REVISION ('base' drops every table)."""
    from textnlp_jobs.db.migrate import downgrade

    downgrade(get_settings().database_url_value(), revision)
    say(f"ledger at {revision}")
