"""Runs a maintenance task the same way from beat and by hand: lock, record, run, record, measure."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from textnlp_jobs.db.models import MaintenanceRun, utcnow
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.maintenance.locks import maintenance_lock
from textnlp_jobs.maintenance.registry import TaskContext, get_task
from textnlp_jobs.metrics.maintenance import record_maintenance_run
from textnlp_jobs.settings import Settings, get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def run_maintenance(name: str, *, dry_run: bool = False, celery: Celery | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Run task ``name`` once and return its result with a ``status`` (succeeded, skipped, failed).

    A run that finds another run of the same task holding the lock returns ``{"status": "locked"}``
    at once (and is recorded as such). The lock lives longer than the task's time limit. Every run is
    recorded in ``maintenance_runs`` (with ``dry_run``) and in the maintenance metrics.
    """
    task = get_task(name)
    settings = settings or get_settings()
    if celery is None:
        from textnlp_jobs.celery_app import create_app

        celery = create_app(settings)
    factory = session_factory(settings)
    started = time.monotonic()
    with maintenance_lock(settings, name, ttl_seconds=task.lock_ttl) as held:
        if not held:
            # Recorded too, so the history shows a run that was refused (two beats, a run by hand).
            with factory.begin() as session:
                now = utcnow()
                session.add(MaintenanceRun(task=name, status="locked", dry_run=dry_run, started_at=now,
                                           finished_at=now, result={"status": "locked"}))
            log.info("maintenance_skipped task=%s reason=locked", name)
            record_maintenance_run(name, "locked", time.monotonic() - started)
            return {"status": "locked"}
        with factory.begin() as session:
            run = MaintenanceRun(task=name, status="running", dry_run=dry_run, started_at=utcnow(), result={})
            session.add(run)
            session.flush()
            run_id = run.id
        context = TaskContext(settings=settings, session_factory=factory, celery=celery, dry_run=dry_run,
                              log=logging.getLogger(f"textnlp_jobs.maintenance.task.{name}"))
        status, result = "failed", {}
        try:
            raw = task.fn(context)
            result = {k: v for k, v in raw.items() if k != "status"} | {"dry_run": dry_run}
            status = "skipped" if raw.get("status") == "skipped" else "succeeded"
            return {"status": status, **result}
        except Exception as error:
            result = {"error": f"{type(error).__name__}: {error}", "dry_run": dry_run}
            log.exception("maintenance_failed task=%s", name)
            raise
        finally:
            duration = time.monotonic() - started
            with factory.begin() as session:
                session.execute(update(MaintenanceRun).where(MaintenanceRun.id == run_id)
                                .values(status=status, finished_at=utcnow(), result={"status": status, **result}))
            record_maintenance_run(name, status, duration)
            log.info("maintenance_finished task=%s status=%s dry_run=%s seconds=%.3f",
                     name, status, dry_run, duration)

