"""Queues no one consumes: ``queues.dead_letter`` moves their old messages to ``textnlp.dead_letter``
and marks their jobs ``dead`` (``queue.no_consumer``); ``requeue`` sends dead jobs back once the cause
is fixed. Nothing is dropped: a message leaves its queue only in the same transaction that appends it
to the dead-letter list.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.constants import DEAD_LETTER_QUEUE, DEVICE_QUEUE_PREFIX, GENERATION_QUEUE_PREFIX
from textnlp_jobs.db.models import AuditLog, Generation, JobStatus, utcnow
from textnlp_jobs.db.repository import Routing
from textnlp_jobs.errors import ErrorCode, UsageError
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task, skipped
from textnlp_jobs.settings import Settings

if TYPE_CHECKING:
    import redis
    from celery import Celery

NO_CONSUMER = ErrorCode.QUEUE_NO_CONSUMER
JOB_QUEUE_PREFIXES = (GENERATION_QUEUE_PREFIX, DEVICE_QUEUE_PREFIX)
# kombu's Redis transport keeps priority levels of a queue in lists named "<queue>\x06\x16<n>".
PRIORITY_SEPARATOR = "\x06\x16"


def uses_redis(settings: Settings) -> bool:
    return settings.broker_url_value().startswith(("redis://", "rediss://", "unix://"))


def redis_client(settings: Settings) -> redis.Redis:
    import redis

    return redis.Redis.from_url(settings.broker_url_value(), decode_responses=False)


def consumed_queues(celery: Celery, timeout: float = 2.0) -> set[str] | None:
    """Names of the queues some live worker consumes now; None when no worker answered."""
    replies = celery.control.inspect(timeout=timeout).active_queues() or {}
    if not replies:
        return None
    return {queue["name"] for queues in replies.values() for queue in (queues or []) if "name" in queue}


def queue_name(key: bytes | str) -> str:
    """The queue a Redis list belongs to (its priority suffix removed)."""
    name = key.decode() if isinstance(key, bytes) else key
    return name.split(PRIORITY_SEPARATOR, 1)[0]


def job_queue_keys(client: redis.Redis) -> Iterator[bytes]:
    for prefix in JOB_QUEUE_PREFIXES:
        yield from client.scan_iter(match=f"{prefix}*", count=1000, _type="list")


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def message_job_id(raw: bytes | str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(json.loads(raw)["headers"]["id"]))
    except (ValueError, KeyError, TypeError):
        return None


def _old_jobs(factory: sessionmaker[Session], ids: Sequence[uuid.UUID], older_than: float) -> set[uuid.UUID]:
    """Of these jobs, the queued ones whose message was sent longer ago than ``older_than`` seconds."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    g = Generation
    out: set[uuid.UUID] = set()
    with factory() as session:
        for start in range(0, len(ids), 1000):
            chunk = ids[start:start + 1000]
            out.update(session.execute(select(g.id).where(
                g.id.in_(chunk), g.status == JobStatus.QUEUED.value,
                func.coalesce(g.published_at, g.created_at) <= cutoff)).scalars())
    return out


def _dead_letter_message(raw: bytes, queue: str) -> str:
    """The message as it was, with where it came from and why in its headers."""
    message = json.loads(raw)
    message.setdefault("headers", {})["x-dead-letter"] = {"reason": NO_CONSUMER, "queue": queue, "at": time.time()}
    return json.dumps(message)


@maintenance_task("queues.dead_letter", schedule="30 3 * * *", time_limit_s=1800)
def dead_letter(ctx: TaskContext) -> dict[str, Any]:
    """Move old messages of queues no worker consumes to textnlp.dead_letter; mark their jobs dead."""
    settings = ctx.settings
    if not uses_redis(settings):
        return skipped("dead-lettering needs the Redis broker (the folder broker cannot list consumers)")
    consumed = consumed_queues(ctx.celery) or set()
    client = redis_client(settings)
    report: dict[str, Any] = {"older_than_seconds": settings.dead_letter_after_seconds, "queues": {},
                              "consumed_queues": sorted(consumed)}
    moved_ids: list[uuid.UUID] = []
    try:
        for key in job_queue_keys(client):
            queue = queue_name(key)
            if queue in consumed:
                continue
            raws = [as_bytes(raw) for raw in client.lrange(key, 0, -1)]
            by_id = {job: raw for raw in raws if (job := message_job_id(raw)) is not None}
            old = _old_jobs(ctx.session_factory, list(by_id), settings.dead_letter_after_seconds)
            entry = report["queues"].setdefault(queue, {"messages": 0, "dead_lettered": 0, "kept_young": 0})
            entry["messages"] += len(raws)
            entry["kept_young"] += len(by_id) - len(old)
            if ctx.dry_run or not old:
                entry["dead_lettered"] += len(old)
                continue
            for job in old:
                with client.pipeline(transaction=True) as pipe:  # MULTI: both or neither
                    pipe.lrem(key, 1, by_id[job])  # type: ignore[arg-type]
                    pipe.rpush(DEAD_LETTER_QUEUE, _dead_letter_message(by_id[job], queue))
                    removed, _ = pipe.execute()
                if removed:
                    moved_ids.append(job)
                    entry["dead_lettered"] += 1
    finally:
        client.close()
    marked = 0 if ctx.dry_run else _mark_dead(ctx.session_factory, moved_ids)
    report["jobs_marked_dead"] = marked
    report["dead_lettered"] = sum(q["dead_lettered"] for q in report["queues"].values())
    if report["dead_lettered"]:
        ctx.log.warning("dead_lettered messages=%d jobs_marked=%d dry_run=%s", report["dead_lettered"], marked,
                        ctx.dry_run)
    return report


def _mark_dead(factory: sessionmaker[Session], ids: Sequence[uuid.UUID]) -> int:
    now, marked = utcnow(), 0
    for start in range(0, len(ids), 1000):
        chunk = list(ids[start:start + 1000])
        with factory.begin() as session:
            updated = session.execute(
                update(Generation).where(Generation.id.in_(chunk), Generation.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.DEAD.value, error_code=NO_CONSUMER, lease_expires_at=None,
                        error_message="no worker consumed the job's queue; see textnlp.dead_letter",
                        finished_at=now, updated_at=now)
                .returning(Generation.id)).scalars().all()
            _audit(session, "queues.dead_letter", "generation.dead_lettered", updated)
            marked += len(updated)
    return marked


def _audit(session: Session, actor: str, action: str, ids: Sequence[uuid.UUID]) -> None:
    if ids:
        now = utcnow()
        session.execute(insert(AuditLog), [
            {"at": now, "actor": actor, "action": action, "entity_type": "generation", "entity_id": str(i),
             "details": {}} for i in ids])


REQUEUEABLE = (JobStatus.DEAD.value, JobStatus.FAILED.value, JobStatus.EXPIRED.value)


def requeue(settings: Settings, factory: sessionmaker[Session], celery: Celery, *, status: str = "dead",
            model: str | None = None, limit: int = 100_000, dry_run: bool = False) -> dict[str, Any]:
    """Send jobs in ``status`` (dead by default) back to their queues with a new attempt budget, and
    drop their messages from ``textnlp.dead_letter``. Returns how many and which models."""
    from textnlp_jobs.publish import publish_and_mark

    if status not in REQUEUEABLE:
        raise UsageError(f"only {', '.join(REQUEUEABLE)} jobs can be requeued, not {status!r}",
                         code=ErrorCode.JOBS_NOT_REQUEUEABLE)
    g = Generation
    with factory() as session:
        query = select(g.id, g.model, g.device, g.priority).where(g.status == status)
        if model:
            query = query.where(g.model == model)
        rows = session.execute(query.order_by(g.priority.desc(), g.created_at).limit(limit)).all()
    routings = [Routing(r.id, r.model, r.device, r.priority) for r in rows]
    by_model: dict[str, int] = {}
    for r in routings:
        by_model[r.model] = by_model.get(r.model, 0) + 1
    if dry_run or not routings:
        return {"status_from": status, "requeued": 0, "would_requeue": len(routings), "models": by_model}
    requeued: list[Routing] = []
    now = utcnow()
    for start in range(0, len(routings), 1000):
        chunk = routings[start:start + 1000]
        with factory.begin() as session:
            ids = set(session.execute(
                update(g).where(g.id.in_([r.id for r in chunk]), g.status == status)
                .values(status=JobStatus.QUEUED.value, attempts=0, error_code=None, error_message=None,
                        lease_expires_at=None, worker=None, finished_at=None, published_at=None,
                        archived=False, updated_at=now)
                .returning(g.id)).scalars())
            _audit(session, "jobs.requeue", "generation.requeued", sorted(ids))
        requeued.extend(r for r in chunk if r.id in ids)
    publish_and_mark(celery, settings, factory, requeued)
    if uses_redis(settings):
        _drop_dead_letters(settings, {r.id for r in requeued})
    return {"status_from": status, "requeued": len(requeued), "models": by_model}


def _drop_dead_letters(settings: Settings, ids: set[uuid.UUID]) -> None:
    client = redis_client(settings)
    try:
        for raw in client.lrange(DEAD_LETTER_QUEUE, 0, -1):
            job = message_job_id(raw)
            if job is not None and job in ids:
                client.lrem(DEAD_LETTER_QUEUE, 1, raw)  # type: ignore[arg-type]
    finally:
        client.close()
