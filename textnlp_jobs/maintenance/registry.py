"""The maintenance task registry: one declaration per task.

A task is a function ``fn(ctx) -> dict`` decorated with ``@maintenance_task(...)`` in the module of
its area (``maintenance/database.py``, ``maintenance/cache.py``, ...). From that declaration come the
Celery task (``tasks/maintenance.py``), its route, the beat entry (``maintenance/schedule.py``), the
CLI entry (``textnlp-jobs maintenance run|list``), the lock and the ``maintenance_runs`` row
(``maintenance/runner.py``). A new area adds one line to ``TASK_MODULES``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.constants import MAINTENANCE_HEAVY_QUEUE, MAINTENANCE_QUEUE
from textnlp_jobs.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# Imported by load_tasks() so their decorators run. A new area of maintenance adds one line here.
TASK_MODULES: tuple[str, ...] = (
    "textnlp_jobs.maintenance.reconciler",
    "textnlp_jobs.maintenance.database",
    "textnlp_jobs.maintenance.cache",
    "textnlp_jobs.maintenance.queues",
    "textnlp_jobs.maintenance.health",
    "textnlp_jobs.metrics.expire",
    "textnlp_jobs.maintenance.models",
)


@dataclass(frozen=True)
class TaskContext:
    """What every task function receives."""

    settings: Settings
    session_factory: sessionmaker[Session]
    celery: Celery
    dry_run: bool
    log: logging.Logger


TaskFn = Callable[[TaskContext], dict[str, Any]]


@dataclass(frozen=True)
class MaintenanceTask:
    """One periodic task, declared once."""

    name: str  # "db.retention"
    fn: TaskFn
    schedule: str  # 5-field crontab in UTC; overridable by TEXTNLP_SCHEDULE
    time_limit_s: int
    heavy: bool = False  # True: the textnlp.maintenance.heavy queue
    lock_ttl_s: int | None = None  # default: longer than time_limit_s
    description: str = ""  # first line of fn's docstring if empty

    @property
    def queue(self) -> str:
        return MAINTENANCE_HEAVY_QUEUE if self.heavy else MAINTENANCE_QUEUE

    @property
    def lock_ttl(self) -> int:
        """Seconds the run's lock lives: always past the time limit, so a long run keeps its lock."""
        if self.lock_ttl_s is not None:
            return self.lock_ttl_s
        return self.time_limit_s + max(60, self.time_limit_s // 4)


_TASKS: dict[str, MaintenanceTask] = {}


def maintenance_task(name: str, *, schedule: str, time_limit_s: int, heavy: bool = False,
                     lock_ttl_s: int | None = None) -> Callable[[TaskFn], TaskFn]:
    """Decorator: declares and registers one task. The Celery task, beat entry, CLI entry, lock and
    maintenance_runs row all come from it."""
    if len(schedule.split()) != 5:
        raise ValueError(f"{name}: schedule {schedule!r} is not a 5-field crontab")
    if lock_ttl_s is not None and lock_ttl_s <= time_limit_s:
        raise ValueError(f"{name}: lock_ttl_s ({lock_ttl_s}) must exceed time_limit_s ({time_limit_s})")

    def register(fn: TaskFn) -> TaskFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        task = MaintenanceTask(name=name, fn=fn, schedule=schedule, time_limit_s=time_limit_s, heavy=heavy,
                               lock_ttl_s=lock_ttl_s, description=doc[0].strip() if doc else "")
        existing = _TASKS.get(name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"maintenance task {name!r} is declared twice")
        _TASKS[name] = task
        return fn

    return register


def load_tasks() -> dict[str, MaintenanceTask]:
    """Every declared task by name (imports ``TASK_MODULES`` first)."""
    for module in TASK_MODULES:
        importlib.import_module(module)
    return dict(sorted(_TASKS.items()))


def get_task(name: str) -> MaintenanceTask:
    """The task called ``name``; a ConfigurationError naming the known ones if there is none."""
    from textnlp_jobs.errors import ErrorCode, UsageError

    tasks = load_tasks()
    if name not in tasks:
        raise UsageError(f"unknown maintenance task {name!r} (known: {', '.join(tasks)})",
                         code=ErrorCode.MAINTENANCE_UNKNOWN_TASK)
    return tasks[name]


def skipped(reason: str, **details: Any) -> dict[str, Any]:
    """The result of a task that does not apply here (e.g. a Redis task on the folder broker)."""
    return {"status": "skipped", "reason": reason, **details}
