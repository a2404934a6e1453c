"""The device registry and worker liveness, kept in the ledger (it works on SQLite and PostgreSQL
alike, so the embedded default gets the same protection).

A device worker registers its device when it starts, refreshes ``heartbeat_at`` every few seconds
and marks ``stopped_at`` when it stops cleanly. A running job records the device that claimed it
(``generations.worker`` is the device's name). Such a job is *orphaned* when its device's heartbeat
expired, or when the device's current worker started after the job was claimed (the worker that
claimed it is gone): orphans go back to ``queued`` at once instead of waiting for their lease.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from textnlp_jobs.db.models import DeviceWorker, Generation, JobStatus, utcnow
from textnlp_jobs.db.repository import Routing
from textnlp_jobs.devices import Device


@dataclass(frozen=True)
class DeviceRecord:
    """A registered device as producers and operators see it."""

    name: str
    hostname: str
    models: list[str]
    alive: bool
    heartbeat_at: datetime | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(row: DeviceWorker, ttl_seconds: float, now: datetime) -> bool:
    """Whether the worker recorded on ``row`` still runs: a fresh heartbeat, and on this very
    machine a process with its pid (a SIGKILLed worker's heartbeat stays fresh for a while)."""
    if row.stopped_at is not None or row.heartbeat_at is None:
        return False
    if row.heartbeat_at < now - timedelta(seconds=ttl_seconds):
        return False
    if row.host == socket.gethostname():
        # Our own pid on our own machine is an earlier incarnation (a restarted container's
        # entry point gets the same pid again): it is gone, whatever its heartbeat says.
        return row.pid != os.getpid() and _pid_alive(row.pid)
    return True


def register(session: Session, device: Device, models: list[str], instance: str,
             ttl_seconds: float) -> DeviceWorker | None:
    """Record this process as the worker of ``device``. Returns the row of another live worker
    that already serves the device (and changes nothing), or None once registered."""
    now = utcnow()
    values = {"node": device.node, "device": device.local, "hostname": device.hostname,
              "models": {"served": list(models)}, "instance": instance, "host": socket.gethostname(),
              "pid": os.getpid(), "started_at": now, "heartbeat_at": now, "stopped_at": None}
    row = session.get(DeviceWorker, device.name, with_for_update=True)
    if row is None:
        # Two workers inserting at once: one INSERT fails (IntegrityError) and its caller
        # registers again in a new transaction, where it finds the other's row.
        session.add(DeviceWorker(name=device.name, **values))
        session.flush()
        return None
    if row.instance != instance and holder_alive(row, ttl_seconds, now):
        return row
    for key, value in values.items():
        setattr(row, key, value)
    return None


def heartbeat(session: Session, device: Device, instance: str) -> bool:
    """Refresh this worker's heartbeat; False when another worker has taken the device over."""
    now = utcnow()
    return bool(session.execute(
        update(DeviceWorker).where(DeviceWorker.name == device.name, DeviceWorker.instance == instance)
        .values(heartbeat_at=now, stopped_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def unregister(session: Session, device: Device, instance: str) -> None:
    """A clean stop: the device stays known, its worker is no longer alive."""
    session.execute(
        update(DeviceWorker).where(DeviceWorker.name == device.name, DeviceWorker.instance == instance)
        .values(stopped_at=utcnow(), heartbeat_at=None)
    )


def mark_dead(session: Session, host: str, pid: int) -> int:
    """The supervisor saw this worker process die: it is no longer alive, whatever its last
    heartbeat says, so its running jobs are orphans from now on."""
    return int(session.execute(
        update(DeviceWorker).where(DeviceWorker.host == host, DeviceWorker.pid == pid,
                                   DeviceWorker.stopped_at.is_(None))
        .values(stopped_at=utcnow(), heartbeat_at=None)
    ).rowcount)  # type: ignore[attr-defined]


def known_devices(session: Session, ttl_seconds: float) -> list[DeviceRecord]:
    """Every device a worker ever served, with whether its worker is alive now."""
    now = utcnow()
    rows = session.execute(select(DeviceWorker).order_by(DeviceWorker.name)).scalars().all()
    return [DeviceRecord(row.name, row.hostname, list(row.models.get("served", [])),
                         holder_alive(row, ttl_seconds, now), row.heartbeat_at) for row in rows]


def rescue_orphans(session: Session, ttl_seconds: float, limit: int = 1000) -> list[Routing]:
    """Running jobs whose worker is gone go back to ``queued`` without waiting for their lease
    (the lease stays the backstop for a worker that is alive but stuck). Returns what the caller
    must publish again. The UPDATE is conditional, so two rescuers never both take a job."""
    now = utcnow()
    stale = now - timedelta(seconds=ttl_seconds)
    d, g = DeviceWorker, Generation
    gone = or_(d.stopped_at.is_not(None), d.heartbeat_at.is_(None), d.heartbeat_at < stale,
               g.started_at < d.started_at)
    rows = session.execute(
        select(g.id, g.model, g.device, g.priority, g.worker, g.attempts)
        .join(d, d.name == g.worker)
        .where(g.status == JobStatus.RUNNING.value, gone)
        .limit(limit)
    ).all()
    rescued: list[Routing] = []
    for row in rows:
        moved = session.execute(
            update(g).where(and_(g.id == row.id, g.status == JobStatus.RUNNING.value, g.attempts == row.attempts,
                                 g.worker == row.worker))
            .values(status=JobStatus.QUEUED.value, lease_expires_at=None, worker=None, published_at=None,
                    updated_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if moved:
            rescued.append(Routing(row.id, row.model, row.device, row.priority))
    return rescued


NO_CONSUMER = "queue.no_consumer"


def flag_unconsumed(session: Session, quiet_seconds: float, limit: int) -> dict[str, int]:
    """Queued jobs whose queue no worker has consumed for ``quiet_seconds`` (no device serving
    the model, or the pinned device, has beaten since) get ``error_code = queue.no_consumer``
    and stay queued: a worker that comes later still runs them (a success clears the code).
    Returns the number flagged per (model, device) queue."""
    now = utcnow()
    cutoff = now - timedelta(seconds=quiet_seconds)
    recent = session.execute(
        select(DeviceWorker.name, DeviceWorker.models).where(DeviceWorker.heartbeat_at >= cutoff)
    ).all()
    served = {model for row in recent for model in row.models.get("served", [])}
    devices = {row.name for row in recent}
    g = Generation
    groups = session.execute(
        select(g.model, g.device).where(g.status == JobStatus.QUEUED.value,
                                        or_(g.error_code.is_(None), g.error_code != NO_CONSUMER))
        .group_by(g.model, g.device)
    ).all()
    flagged: dict[str, int] = {}
    for model, device in groups:
        if (device in devices) if device else (model in served):
            continue
        where = f"device {device}" if device else f"model {model}"
        ids = session.execute(
            select(g.id).where(g.status == JobStatus.QUEUED.value, g.model == model,
                               g.device.is_(None) if device is None else g.device == device,
                               or_(g.error_code.is_(None), g.error_code != NO_CONSUMER)).limit(limit)
        ).scalars().all()
        count = session.execute(
            update(g).where(g.id.in_(ids), g.status == JobStatus.QUEUED.value)
            .values(error_code=NO_CONSUMER, updated_at=now,
                    error_message=f"no live worker has consumed the queue of {where} for over {quiet_seconds:.0f}s"),
            execution_options={"synchronize_session": False},
        ).rowcount  # type: ignore[attr-defined]
        if count:
            flagged[f"{model}@{device}" if device else model] = int(count)
    return flagged
