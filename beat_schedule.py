"""What Celery beat sends, and when: the maintenance schedule and nothing else.

The schedule is built in ``textnlp_jobs.maintenance.schedule`` (so the installed package carries
it); this module is the design's entry point to it.
"""

from __future__ import annotations

from textnlp_jobs.maintenance.schedule import FIVE_MINUTES, build_schedule

BEAT_SCHEDULE = build_schedule()

__all__ = ["BEAT_SCHEDULE", "FIVE_MINUTES", "build_schedule"]
