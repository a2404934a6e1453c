"""Runs a maintenance task the same way from beat and by hand: lock, record, run, record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy import update

from textnlp_jobs.constants import RECONCILE_TASK
from textnlp_jobs.db.models import MaintenanceRun, utcnow
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.errors import ConfigurationError
from textnlp_jobs.maintenance.live_messages import live_job_ids
from textnlp_jobs.maintenance.locks import maintenance_lock
from textnlp_jobs.maintenance.reconciler import reconcile
from textnlp_jobs.publish import publish_and_mark
from textnlp_jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _reconcile(settings: Settings, celery: Celery, dry_run: bool) -> dict[str, Any]:
    factory = session_factory(settings)
    report = reconcile(
        settings, factory,
        publish=lambda routings: publish_and_mark(celery, settings, factory, routings),
        live_ids=lambda: live_job_ids(settings, fresh_seconds=settings.lease_seconds),
        dry_run=dry_run,
    )
    return report.as_dict()


TASKS: dict[str, Callable[[Settings, Celery, bool], dict[str, Any]]] = {
    RECONCILE_TASK: _reconcile,
}


def run_maintenance(name: str, *, dry_run: bool = False, celery: Celery | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Run task ``name`` once. Returns its result; ``{"status": "locked"}`` if a run is in progress."""
    if name not in TASKS:
        raise ConfigurationError(f"unknown maintenance task {name!r} (known: {', '.join(sorted(TASKS))})")
    settings = settings or get_settings()
    if celery is None:
        from textnlp_jobs.celery_app import create_app

        celery = create_app(settings)
    factory = session_factory(settings)
    with maintenance_lock(settings, name) as held:
        if not held:
            log.info("maintenance_skipped task=%s reason=locked", name)
            return {"status": "locked"}
        with factory.begin() as session:
            run = MaintenanceRun(task=name, status="running", dry_run=dry_run, started_at=utcnow(), result={})
            session.add(run)
            session.flush()
            run_id = run.id
        status, result = "failed", {}
        try:
            result = TASKS[name](settings, celery, dry_run)
            status = "succeeded"
            return {"status": status, **result}
        except Exception as error:
            result = {"error": f"{type(error).__name__}: {error}"}
            log.exception("maintenance_failed task=%s", name)
            raise
        finally:
            with factory.begin() as session:
                session.execute(update(MaintenanceRun).where(MaintenanceRun.id == run_id)
                                .values(status=status, finished_at=utcnow(), result=result))
