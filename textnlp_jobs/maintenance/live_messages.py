"""Which jobs still have a message in the broker, read from the broker itself.

The reconciler republishes a queued row only when its message is really gone (a Redis flush, a
worker killed with messages prefetched, a publish that failed after the insert).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from textnlp_jobs.constants import (
    DEVICE_QUEUE_PREFIX,
    GENERATION_QUEUE_PREFIX,
    KOMBU_UNACKED_INDEX_KEY,
    KOMBU_UNACKED_KEY,
)
from textnlp_jobs.settings import Settings

_QUEUE_PREFIXES = (GENERATION_QUEUE_PREFIX, DEVICE_QUEUE_PREFIX)


def _job_id(raw: Any) -> str | None:
    """The job id a Celery message carries (we publish with task id = job id)."""
    try:
        message = json.loads(raw) if isinstance(raw, str | bytes) else raw
        return str(message["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _redis_live(settings: Settings, fresh_seconds: float) -> set[str]:
    import redis

    client = redis.Redis.from_url(settings.broker_url_value())
    live: set[str] = set()
    try:
        for prefix in _QUEUE_PREFIXES:
            for key in client.scan_iter(match=f"{prefix}*", count=1000, _type="list"):
                for start in range(0, client.llen(key), 1000):
                    live.update(filter(None, map(_job_id, client.lrange(key, start, start + 999))))
        # Delivered but not acked: live while its delivery is recent. An older one belongs to a
        # worker that died; kombu would only restore it after the visibility timeout.
        recent = set(client.zrangebyscore(KOMBU_UNACKED_INDEX_KEY, time.time() - fresh_seconds, "+inf"))
        for tag, value in client.hscan_iter(KOMBU_UNACKED_KEY, count=1000):
            if tag in recent:
                try:
                    job = _job_id(json.loads(value)[0])
                except (ValueError, IndexError, TypeError):
                    job = None
                if job:
                    live.add(job)
    finally:
        client.close()
    return live


def _filesystem_live(folder: Path) -> set[str]:
    live: set[str] = set()
    if not folder.is_dir():
        return live
    for entry in os.scandir(folder):
        if not entry.name.endswith(".msg") or not any(p in entry.name for p in _QUEUE_PREFIXES):
            continue
        try:
            job = _job_id(Path(entry.path).read_bytes())
        except OSError:  # consumed while we looked
            continue
        if job:
            live.add(job)
    return live


def live_job_ids(settings: Settings, fresh_seconds: float) -> set[str] | None:
    """Ids of jobs with a message in a queue (or recently delivered). None when this broker
    cannot be inspected, in which case callers republish only what is clearly old."""
    url = settings.broker_url_value()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return _redis_live(settings, fresh_seconds)
    if url.startswith("filesystem://"):
        return _filesystem_live(settings.broker_folder())
    return None
