"""What Celery beat sends, and when: the maintenance schedule and nothing else.

The schedule is built from the maintenance task registry (``textnlp_jobs.maintenance.schedule``);
this module re-exports it for operators who look for it here.
"""

from __future__ import annotations

from textnlp_jobs.maintenance.schedule import build_schedule, schedules

__all__ = ["build_schedule", "schedules"]
