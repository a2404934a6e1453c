"""``metrics.expire_groups``: delete the pushgateway groups of workers that stopped pushing.

A worker deletes its own group on a clean shutdown; a SIGKILLed one cannot, and the pushgateway
would serve its last values forever (a dead GPU would look busy). Worker groups are refreshed every
push interval, so one whose ``push_time_seconds`` is older than ``TEXTNLP_PUSHGATEWAY_GROUP_TTL_SECONDS``
belongs to a worker that is gone. One-shot groups of maintenance runs are left alone: they are as
old as the task's last run, and the next run replaces them.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from prometheus_client import delete_from_gateway

from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.metrics.push import WORKER_JOBS
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """One pushgateway group: its grouping labels and when it was last pushed."""

    labels: dict[str, str]
    push_time: float

    @property
    def job(self) -> str:
        return self.labels.get("job", "")


def gateway_base(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def list_groups(url: str, timeout: float) -> list[Group]:
    """Every group the pushgateway holds (its ``/api/v1/metrics`` API)."""
    with urllib.request.urlopen(f"{gateway_base(url)}/api/v1/metrics", timeout=timeout) as response:
        payload = json.load(response)
    groups = []
    for entry in payload.get("data") or []:
        samples = (entry.get("push_time_seconds") or {}).get("metrics") or []
        push_time = float(samples[0]["value"]) if samples else 0.0
        groups.append(Group(dict(entry.get("labels") or {}), push_time))
    return groups


def expire_groups(settings: Settings, *, dry_run: bool = False, now: float | None = None) -> dict[str, Any]:
    """Delete worker groups silent for longer than the TTL. Returns what was (or would be) deleted."""
    if not settings.pushgateway_url:
        return {"status": "skipped", "reason": "no pushgateway configured (TEXTNLP_PUSHGATEWAY_URL)"}
    now = time.time() if now is None else now
    ttl = settings.pushgateway_group_ttl_seconds
    groups = list_groups(settings.pushgateway_url, settings.push_timeout_seconds)
    stale = [g for g in groups if g.job in WORKER_JOBS and now - g.push_time > ttl]
    deleted = []
    for group in stale:
        key = {k: v for k, v in group.labels.items() if k != "job"}
        if not dry_run:
            delete_from_gateway(settings.pushgateway_url, job=group.job, grouping_key=key,
                                timeout=settings.push_timeout_seconds)
            metrics.PUSHGATEWAY_GROUPS_EXPIRED.inc()
        deleted.append({"job": group.job, **key, "silent_seconds": round(now - group.push_time, 1)})
    log.info("pushgateway_groups_expired deleted=%d kept=%d dry_run=%s", len(deleted), len(groups) - len(stale),
             dry_run)
    return {"groups": len(groups), "expired": deleted, "ttl_seconds": ttl, "dry_run": dry_run}


@maintenance_task("metrics.expire_groups", schedule="5 * * * *", time_limit_s=300)
def expire_groups_task(ctx: TaskContext) -> dict[str, Any]:
    """Delete the pushgateway groups of workers that stopped pushing (a SIGKILLed worker's)."""
    return expire_groups(ctx.settings, dry_run=ctx.dry_run)
