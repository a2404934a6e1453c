"""Redis hygiene: ``cache.expire`` (keys of this system with no TTL, idle past the policy, and kombu's
leftovers) and ``cache.memory`` (a memory report, ``MEMORY PURGE`` where jemalloc supports it).

Keys are found with ``SCAN`` (never ``KEYS``) and inspected with ``TTL`` and ``OBJECT IDLETIME`` in
pipelines, a scan page per round trip; neither command resets a key's idle time. Only keys under the
system's prefix are looked at, and its locks and the RedBeat schedule never expire.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from textnlp_jobs.constants import (
    GENERATE_TASK,
    GENERATION_QUEUE_PREFIX,
    KOMBU_UNACKED_INDEX_KEY,
    KOMBU_UNACKED_KEY,
    LOCK_KEY_PREFIX,
    REDBEAT_KEY_PREFIX,
    REDIS_KEY_PREFIX,
)
from textnlp_jobs.db.models import FINAL_STATUSES, Generation, JobStatus, utcnow
from textnlp_jobs.maintenance.queues import (
    JOB_QUEUE_PREFIXES,
    PRIORITY_SEPARATOR,
    as_bytes,
    consumed_queues,
    redis_client,
    uses_redis,
)
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task, skipped
from textnlp_jobs.metrics import registry as metrics

if TYPE_CHECKING:
    import redis

EXPIRE_PREFIXES: tuple[str, ...] = (REDIS_KEY_PREFIX,)
NEVER_EXPIRE: tuple[bytes, ...] = (LOCK_KEY_PREFIX.encode(), REDBEAT_KEY_PREFIX.encode())
SCAN_COUNT = 1000
KOMBU_BINDING_PREFIX = "_kombu.binding."
KOMBU_PERMANENT_BINDING_PREFIX = "_kombu.binding_permanent."

# Delete a key only if it still has no TTL and is still idle: the pipeline's answer may be stale.
_UNLINK_IF_IDLE = """
local removed = 0
for i, key in ipairs(KEYS) do
  if redis.call('TTL', key) == -1 and redis.call('OBJECT', 'IDLETIME', key) > tonumber(ARGV[1]) then
    removed = removed + redis.call('UNLINK', key)
  end
end
return removed
"""


def idle_keys_without_ttl(client: redis.Redis, idle_seconds: float, *, prefixes: Iterable[str] = EXPIRE_PREFIXES,
                          delete: bool = True) -> dict[str, int]:
    """Scan ``prefixes`` and remove keys with no TTL idle longer than ``idle_seconds``.
    Returns counts: scanned, candidates (no TTL and idle), removed."""
    unlink = client.register_script(_UNLINK_IF_IDLE)
    counts = {"scanned": 0, "candidates": 0, "removed": 0}
    for prefix in prefixes:
        cursor = 0
        while True:
            cursor, keys = client.scan(cursor, match=f"{prefix}*", count=SCAN_COUNT)
            keys = [k for k in map(as_bytes, keys) if not k.startswith(NEVER_EXPIRE)]
            counts["scanned"] += len(keys)
            if keys:
                # Two pipelined rounds per page: every key's TTL, then the idle time of those with none.
                with client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.ttl(key)
                    no_ttl = [key for key, ttl in zip(keys, pipe.execute(raise_on_error=False), strict=True)
                              if ttl == -1]
                stale = []
                if no_ttl:
                    with client.pipeline(transaction=False) as pipe:
                        for key in no_ttl:
                            pipe.object("idletime", key)
                        idle_times = pipe.execute(raise_on_error=False)
                    stale = [key for key, idle in zip(no_ttl, idle_times, strict=True)
                             if isinstance(idle, int) and idle > idle_seconds]
                counts["candidates"] += len(stale)
                if stale and delete:
                    counts["removed"] += int(unlink(keys=stale, args=[int(idle_seconds)]))
            if cursor == 0:
                break
    return counts


def stale_unacked(ctx: TaskContext, client: redis.Redis) -> dict[str, int]:
    """kombu's delivered-but-unacked entries of generation messages whose job is already final
    and whose delivery is older than the lease: their worker died after writing the result."""
    cutoff = time.time() - ctx.settings.lease_seconds
    old_tags = set(client.zrangebyscore(KOMBU_UNACKED_INDEX_KEY, 0, cutoff))
    by_job: dict[uuid.UUID, list[bytes]] = {}
    for tag, value in client.hscan_iter(KOMBU_UNACKED_KEY, count=SCAN_COUNT):
        if tag not in old_tags:
            continue
        try:
            message = json.loads(value)[0]
            if message["headers"]["task"] != GENERATE_TASK:
                continue
            job = uuid.UUID(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        by_job.setdefault(job, []).append(tag)
    final: set[uuid.UUID] = set()
    jobs = list(by_job)
    with ctx.session_factory() as session:
        for start in range(0, len(jobs), 1000):
            final.update(session.execute(select(Generation.id).where(
                Generation.id.in_(jobs[start:start + 1000]), Generation.status.in_(FINAL_STATUSES))).scalars())
    tags = [tag for job in final for tag in by_job[job]]
    if tags and not ctx.dry_run:
        with client.pipeline(transaction=True) as pipe:
            pipe.hdel(KOMBU_UNACKED_KEY, *tags)
            pipe.zrem(KOMBU_UNACKED_INDEX_KEY, *tags)
            pipe.execute()
    return {"old_unacked": len(old_tags), "stale_unacked": len(tags)}


def unused_bindings(ctx: TaskContext, client: redis.Redis) -> dict[str, Any]:
    """Bindings of this system's job queues that are empty and that no live worker consumes (a model
    removed from every device). Left alone when no worker answers: absence of answers proves nothing."""
    consumed = consumed_queues(ctx.celery)
    if consumed is None:
        return {"bindings_removed": 0, "bindings_note": "no worker answered; bindings left as they are"}
    removed: list[str] = []
    for key in client.scan_iter(match=f"{KOMBU_BINDING_PREFIX}*", count=SCAN_COUNT, _type="set"):
        for member in client.smembers(key):
            queue = as_bytes(member).decode(errors="replace").split(PRIORITY_SEPARATOR)[-1]
            if not queue.startswith(JOB_QUEUE_PREFIXES) or queue in consumed:
                continue
            lists = [queue, *(f"{queue}{PRIORITY_SEPARATOR}{n}" for n in range(10))]
            if sum(client.llen(name) for name in lists):
                continue  # it still holds messages: queues.dead_letter's business, not ours
            if _recently_used(ctx, queue):
                continue  # a producer may still hold the binding as declared: keep it
            if not ctx.dry_run:
                # kombu keeps a second copy of permanent bindings; its own unbind removes both.
                exchange = as_bytes(key)[len(KOMBU_BINDING_PREFIX):]
                with client.pipeline(transaction=True) as pipe:
                    pipe.srem(key, member)
                    pipe.srem(KOMBU_PERMANENT_BINDING_PREFIX.encode() + exchange, member)
                    pipe.execute()
            removed.append(queue)
    return {"bindings_removed": len(removed), "unused_queues": sorted(set(removed))}


def _recently_used(ctx: TaskContext, queue: str) -> bool:
    """Whether the ledger has a live job for this queue, or any job from within the dead-letter
    window. A producer process caches the bindings it declared; removing one it still publishes to
    would make the transport drop its messages, so only long-unused queues lose their binding."""
    g = Generation
    since = utcnow() - timedelta(seconds=ctx.settings.dead_letter_after_seconds)
    if queue.startswith(GENERATION_QUEUE_PREFIX):
        scope = g.model == queue[len(GENERATION_QUEUE_PREFIX):]
    else:
        scope = g.device.is_not(None)  # pinned queues: any recent pinned job keeps them all
    with ctx.session_factory() as session:
        return session.execute(select(g.id).where(
            scope, or_(g.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]), g.created_at >= since))
            .limit(1)).first() is not None


@maintenance_task("cache.expire", schedule="15 * * * *", time_limit_s=1800)
def expire(ctx: TaskContext) -> dict[str, Any]:
    """Remove this system's Redis keys with no TTL idle past the policy, and kombu's leftovers."""
    if not uses_redis(ctx.settings):
        return skipped("no Redis: the broker is the folder broker")
    client = redis_client(ctx.settings)
    started = time.monotonic()
    try:
        keys = idle_keys_without_ttl(client, ctx.settings.cache_idle_seconds, delete=not ctx.dry_run)
        result: dict[str, Any] = {"idle_seconds": ctx.settings.cache_idle_seconds, "prefixes": list(EXPIRE_PREFIXES),
                                  **keys, **stale_unacked(ctx, client), **unused_bindings(ctx, client)}
    finally:
        client.close()
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _prefix_of(key: str) -> str:
    """The group a key is reported under: ``textnlp:lock``, a queue name, ``_kombu.binding``..."""
    if key.startswith(REDIS_KEY_PREFIX):
        return REDIS_KEY_PREFIX + key[len(REDIS_KEY_PREFIX):].split(":", 1)[0]
    if key.startswith(KOMBU_BINDING_PREFIX):
        return KOMBU_BINDING_PREFIX.rstrip(".")
    return key.split(PRIORITY_SEPARATOR, 1)[0].split(":", 1)[0]


def largest_keys(client: redis.Redis, sample: int, top: int = 3) -> dict[str, Any]:
    """Bytes per key group over (at most) ``sample`` scanned keys, with each group's largest keys."""
    groups: dict[str, dict[str, Any]] = {}
    seen = 0
    cursor = 0
    while seen < sample:
        cursor, keys = client.scan(cursor, count=SCAN_COUNT)
        keys = keys[:sample - seen]
        seen += len(keys)
        if keys:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.memory_usage(key)
                sizes = pipe.execute(raise_on_error=False)
            for key, size in zip(keys, sizes, strict=True):
                if not isinstance(size, int):
                    continue
                name = as_bytes(key).decode(errors="replace")
                group = groups.setdefault(_prefix_of(name), {"keys": 0, "bytes": 0, "largest": []})
                group["keys"] += 1
                group["bytes"] += size
                group["largest"] = sorted([*group["largest"], [name, size]], key=lambda e: -e[1])[:top]
        if cursor == 0:
            break
    return {"sampled_keys": seen, "complete": cursor == 0,
            "by_prefix": dict(sorted(groups.items(), key=lambda item: -item[1]["bytes"]))}


@maintenance_task("cache.memory", schedule="45 * * * *", time_limit_s=900)
def memory(ctx: TaskContext) -> dict[str, Any]:
    """Redis used memory, fragmentation and the largest keys by prefix; MEMORY PURGE on jemalloc."""
    if not uses_redis(ctx.settings):
        return skipped("no Redis: the broker is the folder broker")
    client = redis_client(ctx.settings)
    try:
        info = client.info("memory")
        metrics.REDIS_MEMORY.set(int(info.get("used_memory") or 0))
        allocator = str(info.get("mem_allocator", ""))
        report: dict[str, Any] = {
            "used_memory": info.get("used_memory"), "used_memory_peak": info.get("used_memory_peak"),
            "used_memory_rss": info.get("used_memory_rss"), "maxmemory": info.get("maxmemory"),
            "fragmentation_ratio": info.get("mem_fragmentation_ratio"), "allocator": allocator,
            **largest_keys(client, ctx.settings.cache_memory_sample),
        }
        purge = allocator.startswith("jemalloc")
        if purge and not ctx.dry_run:
            client.memory_purge()
            report["fragmentation_ratio_after_purge"] = client.info("memory").get("mem_fragmentation_ratio")
        report["purged" if not ctx.dry_run else "would_purge"] = purge
    finally:
        client.close()
    return report
