"""Shared test helpers: waiting on the ledger while a system runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy import func, select

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import AuditLog
from textnlp_jobs.db.repository import RESULT_WRITTEN, count_by_status
from textnlp_jobs.maintenance.runner import run_maintenance

PROMPTS = [
    "Return a new list", "This module provides", "The default value is", "Raise an exception if",
    "Create a new thread", "Read the file and", "The number of seconds", "If the timeout is",
]


def job_specs(count: int, **extra: object) -> list[dict[str, object]]:
    return [{"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "model": "demo", "max_new_tokens": 12, **extra}
            for i in range(count)]


def statuses(client: Client, ids: Sequence[uuid.UUID]) -> dict[str, int]:
    with client.sessions() as session:
        return count_by_status(session, ids)


def wait_until_final(client: Client, ids: Sequence[uuid.UUID], timeout: float, *, reconcile_every: float | None = None,
                     during: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
    """Poll the ledger until every job is final; run the reconciler by hand as beat would."""
    give_up = time.monotonic() + timeout
    last_reconcile = time.monotonic()
    while True:
        counts = statuses(client, ids)
        if during:
            during(counts)
        if counts.get("queued", 0) + counts.get("running", 0) == 0:
            return counts
        if time.monotonic() > give_up:
            raise AssertionError(f"jobs not final after {timeout}s: {counts}")
        if reconcile_every is not None and time.monotonic() - last_reconcile >= reconcile_every:
            run_maintenance("jobs.reconcile", settings=client.settings, celery=client.celery)
            last_reconcile = time.monotonic()
        time.sleep(0.25)


def result_writes(client: Client, ids: Sequence[uuid.UUID]) -> dict[str, int]:
    """How many times each job's result was written (one audit row per write)."""
    wanted = {str(i) for i in ids}
    with client.sessions() as session:
        rows = session.execute(
            select(AuditLog.entity_id, func.count()).where(AuditLog.action == RESULT_WRITTEN)
            .group_by(AuditLog.entity_id)
        ).all()
    return {entity: count for entity, count in rows if entity in wanted}


def assert_each_succeeded_exactly_once(client: Client, ids: Sequence[uuid.UUID], final: dict[str, int],
                                       log_tail: str = "") -> None:
    """Every job succeeded and its result was written once: nothing lost, nothing twice."""
    assert final == {"succeeded": len(ids)}, log_tail
    writes = result_writes(client, ids)
    assert len(writes) == len(ids) and set(writes.values()) == {1}
