"""``textnlp-jobs health``: every component's status and the figure behind it."""

from __future__ import annotations

import typer
from rich.table import Table

from textnlp_jobs.cli.base import JsonOption, app, console, emit_json, ensure_ledger
from textnlp_jobs.settings import get_settings


@app.command()
def health(json_output: JsonOption = False) -> None:
    """Check the database, broker, queues, device workers, pushgateway and disk now; exit 1 if any is down."""
    from textnlp_jobs.celery_app import create_app
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.maintenance.health import DOWN, check_health
    from textnlp_jobs.metrics.push import push_after_task

    settings = get_settings()
    ensure_ledger(settings)
    celery = create_app(settings)
    try:
        report = check_health(settings, session_factory(settings), celery)
    finally:
        celery.close()
    push_after_task(settings, "health.check")
    if json_output:
        emit_json(report.as_dict())
    else:
        table = Table("component", "status", "figure", "detail")
        colours = {"ok": "green", "degraded": "yellow", "down": "red"}
        for c in report.components:
            figure = "" if c.value is None else str(c.value)
            table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", figure, c.detail)
        console.print(table)
        console.print(f"overall: {report.status}")
    raise typer.Exit(1 if report.status == DOWN else 0)
