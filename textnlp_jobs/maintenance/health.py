"""``health.check``: is each part of the system up, and the figure that says so.

Components: the database, the broker (Redis), each queue (depth, oldest queued job, consumers), each
known device worker (Celery ``inspect ping`` with a short timeout) and the models it serves, the
pushgateway, and disk free under ``TEXTNLP_HOME`` and the model store. Each gets ``ok``,
``degraded`` or ``down`` with its figure; the same goes out as metrics and as the CLI's table.

Which device workers *should* answer is what the workers announce: a device worker records itself
on start (a Redis hash, or a file under ``TEXTNLP_HOME`` when embedded) and removes itself on a clean
shutdown, so a killed worker stays known and is reported ``down`` until it comes back.
"""

from __future__ import annotations

import logging
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.constants import (
    DEVICE_QUEUE_PREFIX,
    GENERATION_QUEUE_PREFIX,
    MAINTENANCE_QUEUE,
    QUALITY_QUEUE,
    REDIS_KEY_PREFIX,
    generation_queue,
)
from textnlp_jobs.db.models import Generation, JobStatus
from textnlp_jobs.maintenance.registry import TaskContext, maintenance_task
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.metrics.expire import gateway_base
from textnlp_jobs.metrics.maintenance import DB_DEAD_TUPLES, DB_TABLE_BYTES
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

OK, DEGRADED, DOWN = "ok", "degraded", "down"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}
DEVICES_KEY = f"{REDIS_KEY_PREFIX}health:devices"
# kombu's Redis transport keeps one list per priority level: "<queue>", "<queue>\x06\x161", ...
_PRIORITY_SEP = "\x06\x16"
# Ledger tables whose size and dead tuples are reported (a fixed list: names are never user input).
LEDGER_TABLES = ("generations", "prompts", "audit_logs", "maintenance_runs", "model_versions")


@dataclass
class Component:
    """One checked part: its status, the figure behind it, and a short human detail."""

    name: str
    status: str
    value: float | str | None = None
    detail: str = ""


@dataclass
class HealthReport:
    components: list[Component] = field(default_factory=list)

    def add(self, name: str, status: str, value: float | str | None = None, detail: str = "") -> None:
        self.components.append(Component(name, status, value, detail))

    @property
    def status(self) -> str:
        return max((c.status for c in self.components), key=_RANK.__getitem__, default=OK)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "components": [asdict(c) for c in self.components]}


def _is_redis(settings: Settings) -> bool:
    return settings.broker_url_value().startswith(("redis://", "rediss://", "unix://"))


def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url_value(), socket_timeout=2, socket_connect_timeout=2)


# --- device workers announce themselves -----------------------------------------------------------
def _device_file(settings: Settings, device: str) -> Path:
    return settings.home / "health-devices" / f"{settings.node_name}_{device}"


def announce_device(settings: Settings, device: str, hostname: str) -> None:
    """A device worker started: from now on health.check expects ``hostname`` to answer."""
    key = f"{settings.node_name}/{device}"
    if _is_redis(settings):
        client = _redis(settings)
        try:
            client.hset(DEVICES_KEY, key, hostname)
        finally:
            client.close()
        return
    path = _device_file(settings, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hostname)


def retire_device(settings: Settings, device: str) -> None:
    """A device worker stopped cleanly: it is no longer expected."""
    if _is_redis(settings):
        client = _redis(settings)
        try:
            client.hdel(DEVICES_KEY, f"{settings.node_name}/{device}")
        finally:
            client.close()
        return
    _device_file(settings, device).unlink(missing_ok=True)


def known_devices(settings: Settings) -> dict[str, str]:
    """``node/device`` -> worker hostname of every device worker that announced itself."""
    if _is_redis(settings):
        client = _redis(settings)
        try:
            raw = client.hgetall(DEVICES_KEY)
        finally:
            client.close()
        return {k.decode(): v.decode() for k, v in raw.items()}
    folder = settings.home / "health-devices"
    if not folder.is_dir():
        return {}
    return {p.name.replace("_", "/", 1): p.read_text() for p in folder.iterdir()}


# --- the checks -----------------------------------------------------------------------------------
def _check_database(report: HealthReport, factory: sessionmaker[Session], now: float) -> dict[str, float]:
    """Ledger reachable; jobs per status; oldest queued job per model queue. Returns the ages."""
    started = time.monotonic()
    ages: dict[str, float] = {}
    try:
        with factory() as session:
            session.execute(text("SELECT 1"))
            counts = session.execute(select(Generation.model, Generation.status, func.count())
                                     .group_by(Generation.model, Generation.status)).all()
            oldest = session.execute(select(Generation.model, func.min(Generation.created_at))
                                     .where(Generation.status == JobStatus.QUEUED.value)
                                     .group_by(Generation.model)).all()
            if session.get_bind().dialect.name == "postgresql":
                _table_figures(session)
    except Exception as error:
        report.add("database", DOWN, None, type(error).__name__)
        return ages
    report.add("database", OK, round((time.monotonic() - started) * 1000, 1), "ms to answer")
    metrics.LEDGER_JOBS.clear()
    for model, status, count in counts:
        metrics.LEDGER_JOBS.labels(model, status).set(count)
    for model, created in oldest:
        ages[generation_queue(model)] = max(0.0, now - created.timestamp())
    return ages


def _table_figures(session: Session) -> None:
    rows = session.execute(text(
        "SELECT relname, n_dead_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables "
        "WHERE relname = ANY(:tables)"), {"tables": list(LEDGER_TABLES)}).all()
    for name, dead, size in rows:
        DB_DEAD_TUPLES.labels(name).set(dead)
        DB_TABLE_BYTES.labels(name).set(size)


def _queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue, read from the broker itself."""
    depths: dict[str, int] = {MAINTENANCE_QUEUE: 0}
    if _is_redis(settings):
        client = _redis(settings)
        try:
            keys: list[bytes] = []
            for prefix in (GENERATION_QUEUE_PREFIX, DEVICE_QUEUE_PREFIX, MAINTENANCE_QUEUE, QUALITY_QUEUE):
                keys.extend(client.scan_iter(match=f"{prefix}*", count=1000, _type="list"))
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            for key, length in zip(keys, pipe.execute(), strict=True):
                queue = key.decode(errors="replace").split(_PRIORITY_SEP, 1)[0]
                depths[queue] = depths.get(queue, 0) + int(length)
        finally:
            client.close()
        return depths
    folder = settings.broker_folder()
    if folder.is_dir():
        for entry in folder.iterdir():
            # kombu's filesystem transport names a message "<time>_<uuid>.<queue>.msg".
            name = entry.name
            if name.endswith(".msg") and "." in name:
                queue = name.split(".", 1)[1].removesuffix(".msg")
                depths[queue] = depths.get(queue, 0) + 1
    return depths


def _check_broker(report: HealthReport, settings: Settings) -> bool:
    if not _is_redis(settings):
        report.add("broker", OK, "embedded", "filesystem broker under TEXTNLP_HOME")
        return True
    client = _redis(settings)
    try:
        client.ping()
        used = int(client.info("memory").get("used_memory", 0))
    except Exception as error:
        report.add("broker", DOWN, None, f"Redis: {type(error).__name__}")
        return False
    finally:
        client.close()
    metrics.REDIS_MEMORY.set(used)
    report.add("broker", OK, used, "Redis used_memory bytes")
    return True


def _check_workers(report: HealthReport, settings: Settings, celery: Celery) -> dict[str, int]:
    """Ping every worker; each announced device is up or down. Returns consumers per queue."""
    timeout = settings.health_ping_timeout_seconds
    replies = celery.control.ping(timeout=timeout) or []
    alive = {host for reply in replies for host in reply}
    queues_by_host = (celery.control.inspect(timeout=timeout).active_queues() or {}) if alive else {}
    consumers: dict[str, int] = {}
    for queues in queues_by_host.values():
        for queue in queues or []:
            consumers[queue["name"]] = consumers.get(queue["name"], 0) + 1
    devices = known_devices(settings)
    up = 0
    for device, host in sorted(devices.items()):
        if host in alive:
            up += 1
            models = sorted(q["name"].removeprefix(GENERATION_QUEUE_PREFIX) for q in queues_by_host.get(host) or []
                            if q["name"].startswith(GENERATION_QUEUE_PREFIX))
            report.add(f"worker {device}", OK, ",".join(models), f"{host} answered; models served")
        else:
            report.add(f"worker {device}", DOWN, None, f"{host} did not answer a ping within {timeout:.0f}s")
    metrics.WORKERS_ALIVE.set(up)
    others = sorted(alive - set(devices.values()))
    if others:
        report.add("workers other", OK, len(others), ", ".join(others))
    return consumers


def _check_queues(report: HealthReport, settings: Settings, depths: dict[str, int], ages: dict[str, float],
                  consumers: dict[str, int] | None) -> None:
    metrics.QUEUE_DEPTH.clear()
    metrics.QUEUE_OLDEST_AGE.clear()
    # Every model queue that holds jobs, is placed here, or that a live worker consumes: the
    # maintenance worker's own placement need not name the models the device workers serve.
    served = {queue for queue in consumers or {} if queue.startswith(GENERATION_QUEUE_PREFIX)}
    names = (set(depths) | set(ages) | served
             | {generation_queue(m) for ms in settings.placement.values() for m in ms})
    for queue in sorted(names):
        depth, age = depths.get(queue, 0), ages.get(queue, 0.0)
        metrics.QUEUE_DEPTH.labels(queue).set(depth)
        metrics.QUEUE_OLDEST_AGE.labels(queue).set(age)
        status = OK
        if age > settings.health_queue_age_down_seconds:
            status = DOWN
        elif age > settings.health_queue_age_degraded_seconds:
            status = DEGRADED
        detail = f"depth {depth}, oldest queued job {age:.0f}s"
        if consumers is not None and queue.startswith(GENERATION_QUEUE_PREFIX):
            count = consumers.get(queue, 0)
            metrics.QUEUE_CONSUMERS.labels(queue).set(count)
            detail += f", {count} consumer(s)"
            if count == 0 and (depth or age):
                status = DOWN
        report.add(f"queue {queue}", status, depth, detail)


def _check_pushgateway(report: HealthReport, settings: Settings) -> None:
    if not settings.pushgateway_url:
        report.add("pushgateway", OK, "off", "not configured (TEXTNLP_PUSHGATEWAY_URL)")
        return
    try:
        with urllib.request.urlopen(f"{gateway_base(settings.pushgateway_url)}/-/healthy",
                                    timeout=settings.push_timeout_seconds) as response:
            response.read()
        report.add("pushgateway", OK, settings.pushgateway_url, "healthy")
    except Exception as error:
        report.add("pushgateway", DOWN, settings.pushgateway_url, type(error).__name__)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk(report: HealthReport, settings: Settings) -> None:
    for volume, path in (("home", settings.home), ("model_store", settings.model_store_dir())):
        usage = shutil.disk_usage(_existing(path))
        metrics.DISK_FREE.labels(volume).set(usage.free)
        metrics.DISK_SIZE.labels(volume).set(usage.total)
        ratio = usage.free / usage.total if usage.total else 0.0
        status = OK
        if ratio < settings.health_disk_free_down_ratio:
            status = DOWN
        elif ratio < settings.health_disk_free_degraded_ratio:
            status = DEGRADED
        report.add(f"disk {volume}", status, usage.free,
                   f"{usage.free / 2**30:.1f} GiB ({ratio:.0%}) free under {path}")


def check_health(settings: Settings, factory: sessionmaker[Session], celery: Celery,
                 clock: Callable[[], float] = time.time) -> HealthReport:
    """Check every component once and record the result as metrics."""
    report = HealthReport()
    now = clock()
    ages = _check_database(report, factory, now)
    broker_up = _check_broker(report, settings)
    consumers: dict[str, int] | None = None
    depths: dict[str, int] = {}
    if broker_up:
        for attempt in range(2):
            workers = HealthReport()
            try:
                depths = _queue_depths(settings)
                consumers = _check_workers(workers, settings, celery)
                report.components.extend(workers.components)
                break
            except Exception as error:
                # A pooled connection that died with a broker restart fails once and is replaced;
                # a second failure means the broker went away between the checks.
                if attempt:
                    report.add("workers", DOWN, None, f"broker: {type(error).__name__}")
    else:  # a ping through a dead broker would wait on reconnects; say why instead
        for device in known_devices(settings) if not _is_redis(settings) else []:
            report.add(f"worker {device}", DOWN, None, "broker down")
        report.add("workers", DOWN, None, "broker down: workers cannot be reached")
    _check_queues(report, settings, depths, ages, consumers)
    _check_pushgateway(report, settings)
    _check_disk(report, settings)
    metrics.HEALTH_STATUS.clear()
    for component in report.components:
        metrics.HEALTH_STATUS.labels(component.name).set(_RANK[component.status])
    metrics.HEALTH_LAST_RUN.set(now)
    log.info("health_checked status=%s down=%s", report.status,
             ",".join(c.name for c in report.components if c.status == DOWN) or "-")
    return report


@maintenance_task("health.check", schedule="*/5 * * * *", time_limit_s=120)
def health_check(ctx: TaskContext) -> dict[str, Any]:
    """Database, broker, queues, workers and their models, pushgateway, disk: a status per component."""
    # Read-only: a dry run checks the same things. "status" of a run result is the run's own
    # (succeeded/failed), so the overall health goes under "health".
    report = check_health(ctx.settings, ctx.session_factory, ctx.celery).as_dict()
    return {"health": report.pop("status"), **report}
