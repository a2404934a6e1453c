"""The Celery application. Configured lazily from the settings on first use, never at import."""

from __future__ import annotations

from typing import Any

from celery import Celery

from textnlp_jobs import folder_broker
from textnlp_jobs.constants import GENERATE_TASK, MAINTENANCE_QUEUE, REDBEAT_KEY_PREFIX
from textnlp_jobs.maintenance.schedule import build_schedule, task_routes
from textnlp_jobs.settings import Settings, get_settings

# filesystem:// (the embedded broker) writes each message atomically; see folder_broker.
folder_broker.install()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting the system relies on, in one place."""
    if settings.embedded:
        settings.broker_folder().mkdir(parents=True, exist_ok=True)
    url = settings.broker_url_value()
    redis_broker = url.startswith(("redis://", "rediss://", "unix://"))
    return {
        "broker_url": settings.broker_url_value(),
        "broker_transport_options": settings.broker_transport_options(),
        # Redis through a channel that dead-letters malformed queue items instead of crashing.
        "broker_transport": "textnlp_jobs.broker_transport:Transport" if redis_broker else None,
        # Messages Celery cannot run (unknown task, bad envelope) go to textnlp.dead_letter.
        "worker_consumer": "textnlp_jobs.dead_letter:DeadLetteringConsumer",
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a Redis restart is waited out, not fatal
        "result_backend": settings.result_backend.get_secret_value() if settings.result_backend else None,
        "task_ignore_result": True,  # results live in the ledger
        # With no result backend there is nothing to expire: otherwise beat adds Celery's own
        # daily celery.backend_cleanup, a task no maintenance list shows and nothing needs.
        **({} if settings.result_backend else {"result_expires": None}),
        # JSON only: a pickled message is refused before anything runs.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A message is acked only after its job's row is written; a lost worker's jobs come back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A task that raised (a job that ended failed or dead, after its row was written) is
        # acked, not redelivered: the ledger, not the broker, decides about retries.
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_routes": task_routes(),
        "task_default_queue": MAINTENANCE_QUEUE,
        "task_create_missing_queues": True,
        # Per-task events cost a publish each on the hot path; Flower switches them on when it
        # connects (enable_events), and TEXTNLP_TASK_EVENTS=true turns them on from the start.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "beat_schedule": build_schedule(settings),
        "timezone": "UTC",
        # Beat wakes at least this often; RedBeat extends its lock on every wake-up, and a second
        # beat (started by mistake, or a standby) retries the lock at this pace and sends nothing.
        "beat_max_loop_interval": 10,
        **({} if settings.embedded else {
            "redbeat_redis_url": settings.broker_url_value(),
            "redbeat_key_prefix": REDBEAT_KEY_PREFIX,
            "redbeat_lock_timeout": 60,
        }),
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app. With ``settings`` it is configured now (producers, tests); without, from
    ``get_settings()`` when first used (the worker and beat processes)."""
    celery = Celery("textnlp_jobs", include=["textnlp_jobs.tasks.generation", "textnlp_jobs.tasks.maintenance"])
    if settings is not None:
        celery.conf.update(celery_config(settings))
    else:
        celery.on_configure.connect(_configure_from_environment, weak=False)
    return celery


def _configure_from_environment(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings()))


app = create_app()

__all__ = ["GENERATE_TASK", "app", "celery_config", "create_app"]
