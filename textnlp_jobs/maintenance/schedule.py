"""What Celery beat sends, and when. ``celery_app`` reads it from here, so an installed package
needs nothing from the repository; the top-level ``beat_schedule.py`` re-exports it."""

from __future__ import annotations

from typing import Any

from textnlp_jobs.constants import MAINTENANCE_QUEUE, RECONCILE_TASK

FIVE_MINUTES = 300.0


def build_schedule(reconcile_every: float = FIVE_MINUTES) -> dict[str, Any]:
    """The beat schedule; intervals are arguments so tests and demos can run it faster."""
    return {
        RECONCILE_TASK: {
            "task": RECONCILE_TASK,
            "schedule": reconcile_every,
            # A run that could not start within one period is superseded by the next one.
            "options": {"queue": MAINTENANCE_QUEUE, "expires": reconcile_every},
        },
    }
