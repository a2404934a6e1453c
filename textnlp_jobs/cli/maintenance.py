"""``textnlp-jobs maintenance``: run maintenance tasks by hand."""

from __future__ import annotations

from typing import Annotated

import typer

from textnlp_jobs.cli.base import console, ensure_ledger, maintenance_app
from textnlp_jobs.settings import get_settings


@maintenance_app.command("run")
def maintenance_run(task: str, dry_run: Annotated[bool, typer.Option("--dry-run")] = False) -> None:
    """Run one maintenance task now (e.g. jobs.reconcile), with the same lock beat uses."""
    from textnlp_jobs.maintenance.runner import run_maintenance

    settings = get_settings()
    ensure_ledger(settings)
    console.print(run_maintenance(task, dry_run=dry_run, settings=settings))
