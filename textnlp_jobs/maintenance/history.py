"""What ``maintenance list`` and ``maintenance history`` show: the tasks, their schedule and runs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from textnlp_jobs.db.models import MaintenanceRun, utcnow
from textnlp_jobs.maintenance import schedule as schedules
from textnlp_jobs.maintenance.registry import load_tasks
from textnlp_jobs.settings import Settings


@dataclass(frozen=True)
class TaskStatus:
    name: str
    queue: str
    schedule: str
    next_run: datetime | None
    last_run: datetime | None
    last_status: str | None
    description: str


@dataclass(frozen=True)
class RunRecord:
    id: int
    task: str
    status: str
    dry_run: bool
    started_at: datetime
    finished_at: datetime | None
    result: dict[str, Any]

    @property
    def seconds(self) -> float | None:
        return (self.finished_at - self.started_at).total_seconds() if self.finished_at else None


def task_statuses(session: Session, settings: Settings) -> list[TaskStatus]:
    """Every declared task with its effective schedule, next run and last run (not a dry run, not
    a run refused by the lock)."""
    tasks = load_tasks()
    effective = schedules.schedules(settings, tasks)
    latest = (select(MaintenanceRun.task, func.max(MaintenanceRun.id).label("id"))
              .where(MaintenanceRun.dry_run.is_(False), MaintenanceRun.status != "locked")
              .group_by(MaintenanceRun.task).subquery())
    rows = session.execute(select(MaintenanceRun.task, MaintenanceRun.started_at, MaintenanceRun.status)
                           .join(latest, MaintenanceRun.id == latest.c.id)).all()
    last = {row.task: (row.started_at, row.status) for row in rows}
    now = utcnow()
    out = []
    for name, task in tasks.items():
        started, status = last.get(name, (None, None))
        out.append(TaskStatus(name, task.queue, schedules.describe(effective[name]),
                              schedules.next_run(effective[name], now, started), started, status, task.description))
    return out


def run_history(session: Session, task: str | None = None, limit: int = 20) -> list[RunRecord]:
    """The newest runs, optionally of one task."""
    query = select(MaintenanceRun).order_by(MaintenanceRun.id.desc()).limit(limit)
    if task:
        query = query.where(MaintenanceRun.task == task)
    return [RunRecord(r.id, r.task, r.status, r.dry_run, r.started_at, r.finished_at, r.result)
            for r in session.execute(query).scalars()]
