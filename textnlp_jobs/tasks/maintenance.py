"""One Celery task per declared maintenance task, named as the task (``db.retention``).

Beat sends them to ``textnlp.maintenance`` or, for heavy ones, ``textnlp.maintenance.heavy``. Each
is a thin shell over the runner: the lock, the run record and the metrics are the runner's.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from textnlp_jobs.celery_app import app
from textnlp_jobs.maintenance.registry import MaintenanceTask, load_tasks
from textnlp_jobs.maintenance.runner import run_maintenance


def _celery_task(task: MaintenanceTask) -> Task[Any, Any]:
    def run(dry_run: bool = False) -> dict[str, Any]:
        return run_maintenance(task.name, dry_run=bool(dry_run), celery=app)

    run.__name__ = run.__qualname__ = task.name.replace(".", "_")
    run.__doc__ = task.description
    # Time limits are the declaration's; the lock outlives them (see MaintenanceTask.lock_ttl).
    celery_task: Task[Any, Any] = app.task(
        name=task.name, ignore_result=True, soft_time_limit=task.time_limit_s,
        time_limit=task.time_limit_s + 30, acks_late=False,
    )(run)
    return celery_task


TASKS: dict[str, Task[Any, Any]] = {name: _celery_task(task) for name, task in load_tasks().items()}
