"""``textnlp-jobs db``: the ledger's schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from textnlp_jobs.cli.base import JsonOption, db_app, emit, ensure_ledger, say
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


archive_app = typer.Typer(help="Archives written by db.retention (gzip JSON lines with a manifest).",
                          no_args_is_help=True)
db_app.add_typer(archive_app, name="archive")


@archive_app.command("restore")
def db_archive_restore(file: Annotated[Path, typer.Argument(help="A generations-<day>.jsonl.gz archive.")],
                       as_json: JsonOption = False) -> None:
    """Load an archive back into the ledger (for audits), after checking its sha256 and row count
    against its manifest. Rows already present are left as they are."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.maintenance.archive import restore

    settings = get_settings()
    ensure_ledger(settings)
    emit(restore(session_factory(settings), file), as_json=as_json)
