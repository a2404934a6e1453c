"""``textnlp-jobs maintenance``: the scheduled tasks, their runs, and running one by hand."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from textnlp_jobs.cli.base import JsonOption, emit, ensure_ledger, maintenance_app
from textnlp_jobs.settings import get_settings


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


@maintenance_app.command("list")
def maintenance_list(as_json: JsonOption = False) -> None:
    """Every maintenance task: queue, schedule (UTC), next run, last run and its status."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.maintenance.history import task_statuses

    settings = get_settings()
    ensure_ledger(settings)
    with session_factory(settings)() as session:
        rows = task_statuses(session, settings)
    table = Table("task", "queue", "schedule (UTC)", "next run", "last run", "last status")
    for row in rows:
        table.add_row(row.name, row.queue, row.schedule, _when(row.next_run), _when(row.last_run),
                      row.last_status or "-")
    emit(rows, as_json=as_json, render=table)


@maintenance_app.command("history")
def maintenance_history(
    task: Annotated[str | None, typer.Option("--task", help="Only this task.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many runs.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """The newest maintenance runs (from the maintenance_runs table), newest first."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.maintenance.history import run_history
    from textnlp_jobs.maintenance.registry import get_task

    settings = get_settings()
    ensure_ledger(settings)
    if task:
        get_task(task)  # an unknown name is an error, not an empty table
    with session_factory(settings)() as session:
        runs = run_history(session, task, limit)
    table = Table("id", "task", "status", "dry run", "started", "seconds", "result")
    for run in runs:
        seconds = f"{run.seconds:.2f}" if run.seconds is not None else "-"
        result = json.dumps({k: v for k, v in run.result.items() if k not in ("status", "dry_run")},
                            default=str)
        table.add_row(str(run.id), run.task, run.status, "yes" if run.dry_run else "", _when(run.started_at),
                      seconds, result[:120])
    emit(runs, as_json=as_json, render=table)


@maintenance_app.command("run")
def maintenance_run(task: str, dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
                    as_json: JsonOption = False) -> None:
    """Run one maintenance task now (e.g. db.retention), with the same lock beat uses; --dry-run
    reports what it would do and changes nothing. Exit 1 when another run holds the lock."""
    from textnlp_jobs.maintenance.runner import run_maintenance

    settings = get_settings()
    ensure_ledger(settings)
    result = run_maintenance(task, dry_run=dry_run, settings=settings)
    emit(result, as_json=as_json)
    if result.get("status") == "locked":
        raise typer.Exit(1)
