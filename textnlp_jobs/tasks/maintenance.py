"""Maintenance tasks sent by beat to ``textnlp.maintenance``."""

from __future__ import annotations

from typing import Any

from textnlp_jobs.celery_app import app
from textnlp_jobs.constants import RECONCILE_TASK
from textnlp_jobs.maintenance.runner import run_maintenance


@app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile(dry_run: bool = False) -> dict[str, Any]:
    """Re-publish lost jobs, rescue stuck ones, expire overdue ones, bury poison ones."""
    return run_maintenance(RECONCILE_TASK, dry_run=bool(dry_run), celery=app)
