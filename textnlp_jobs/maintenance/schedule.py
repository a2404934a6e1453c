"""The beat schedule, built from the task registry and the ``TEXTNLP_SCHEDULE`` overrides.

Every time is a 5-field crontab in UTC. ``TEXTNLP_SCHEDULE`` changes one task's time by name
(``{"db.vacuum": "30 2 * * *"}``), turns it off (``"off"``), or gives it an interval in seconds
(``{"jobs.reconcile": 2}``), which tests and demos use to run faster than once a minute.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeAlias

from celery.schedules import crontab

from textnlp_jobs.constants import RECONCILE_TASK
from textnlp_jobs.errors import ConfigurationError, ErrorCode
from textnlp_jobs.maintenance.registry import MaintenanceTask, load_tasks
from textnlp_jobs.settings import Settings

Schedule: TypeAlias = "crontab | float"
OFF = "off"
_DEFAULT_RECONCILE_INTERVAL = 300.0


def parse(value: str | float, task: str = "") -> Schedule:
    """A crontab string or a number of seconds, checked."""
    if isinstance(value, int | float):
        if value <= 0:
            raise ConfigurationError(f"schedule of {task}: an interval must be positive, got {value}")
        return float(value)
    fields = value.split()
    if len(fields) != 5:
        raise ConfigurationError(f"schedule of {task}: {value!r} is not a 5-field crontab (m h dom mon dow)")
    try:
        parsed: crontab = crontab.from_string(value)
        return parsed
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"schedule of {task}: {value!r}: {error}") from error


def schedules(settings: Settings, tasks: dict[str, MaintenanceTask] | None = None) -> dict[str, Schedule | None]:
    """Each task's effective schedule (None: turned off by the settings)."""
    tasks = tasks if tasks is not None else load_tasks()
    unknown = set(settings.schedule) - set(tasks)
    if unknown:
        raise ConfigurationError(f"TEXTNLP_SCHEDULE names unknown task(s): {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(tasks)})", code=ErrorCode.MAINTENANCE_UNKNOWN_TASK)
    out: dict[str, Schedule | None] = {}
    for name, task in tasks.items():
        value: str | float = settings.schedule.get(name, task.schedule)
        if (name == RECONCILE_TASK and name not in settings.schedule
                and settings.reconcile_interval_seconds != _DEFAULT_RECONCILE_INTERVAL):
            value = settings.reconcile_interval_seconds  # the older TEXTNLP_RECONCILE_INTERVAL_SECONDS
        out[name] = None if isinstance(value, str) and value.strip().lower() == OFF else parse(value, name)
    return out


def describe(schedule: Schedule | None) -> str:
    """How ``maintenance list`` shows a schedule."""
    if schedule is None:
        return OFF
    if isinstance(schedule, float):
        return f"every {schedule:g}s"
    return " ".join(str(getattr(schedule, f"_orig_{part}")) for part in
                    ("minute", "hour", "day_of_month", "month_of_year", "day_of_week"))


def _smallest_gap(values: set[int], wrap: int) -> int:
    ordered = sorted(values)
    return min(b - a for a, b in zip(ordered, [*ordered[1:], ordered[0] + wrap], strict=True))


def period_seconds(schedule: Schedule) -> float:
    """The shortest time between two runs (a message not started within it expires)."""
    if isinstance(schedule, float):
        return schedule
    if len(schedule.hour) == 24:
        return 60.0 * _smallest_gap(schedule.minute, 60)
    return 3600.0 * _smallest_gap(schedule.hour, 24)


def next_run(schedule: Schedule | None, now: datetime, last_run: datetime | None = None) -> datetime | None:
    """When beat next sends the task (for listings): the first matching minute after ``now``."""
    if schedule is None:
        return None
    if isinstance(schedule, float):
        return max(now, (last_run or now) + timedelta(seconds=schedule))
    moment = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(366 * 24 * 60):
        if (moment.minute in schedule.minute and moment.hour in schedule.hour
                and moment.day in schedule.day_of_month and moment.month in schedule.month_of_year
                and (moment.weekday() + 1) % 7 in schedule.day_of_week):  # crontab: 0 is Sunday
            return moment
        moment += timedelta(minutes=1)
    return None


def build_schedule(settings: Settings) -> dict[str, Any]:
    """Celery's ``beat_schedule``: one entry per task, on the task's queue. A message that could not
    start within one period is superseded by the next one (it expires)."""
    tasks = load_tasks()
    entries: dict[str, Any] = {}
    for name, schedule in schedules(settings, tasks).items():
        if schedule is None:
            continue
        entries[name] = {
            "task": name,
            "schedule": schedule,
            "options": {"queue": tasks[name].queue, "expires": period_seconds(schedule)},
        }
    return entries


def task_routes() -> dict[str, dict[str, str]]:
    """Celery's ``task_routes`` for every maintenance task."""
    return {name: {"queue": task.queue} for name, task in load_tasks().items()}


def beat_arguments(settings: Settings) -> list[str]:
    """The scheduler arguments of ``celery beat``: RedBeat on Redis (one beat sends, a second one
    waits on its lock), the ordinary scheduler with its state file under the home when embedded."""
    if not settings.embedded and settings.broker_url_value().startswith(("redis://", "rediss://", "unix://")):
        return ["--scheduler=redbeat.RedBeatScheduler"]
    settings.home.mkdir(parents=True, exist_ok=True)
    return [f"--schedule={settings.home / 'beat-schedule'}"]
