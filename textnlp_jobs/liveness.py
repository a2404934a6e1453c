"""A device worker's liveness: it registers its device, refuses to start when another live
worker already serves it, beats every few seconds, and rescues the running jobs of dead workers
(its own killed predecessor's first of all) so they run again within seconds, not a lease."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import device_workers
from textnlp_jobs.db.repository import Routing
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import DeviceInUseError
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

MAX_PRIORITY = 9


def rescue_orphans(settings: Settings, factory: sessionmaker[Session],
                   republish: Callable[[Sequence[Routing]], None]) -> int:
    """Requeue and republish the running jobs of workers that are gone, and the messages they
    had taken from the broker but not yet claimed. Returns how many jobs were rescued."""
    with factory.begin() as session:
        rescued = device_workers.rescue_orphans(session, settings.heartbeat_ttl_seconds)
    if rescued:
        # They were already running: sent at the highest priority they go ahead of the queue
        # instead of behind everything submitted since (the row keeps its own priority).
        republish([replace(routing, priority=MAX_PRIORITY) for routing in rescued])
        stranded = republish_stranded(settings, factory, republish)
        log.warning("orphaned_jobs_rescued count=%d stranded_republished=%d", len(rescued), stranded)
    return len(rescued)


def republish_stranded(settings: Settings, factory: sessionmaker[Session],
                       republish: Callable[[Sequence[Routing]], None]) -> int:
    """A dead worker also held messages it had received but not claimed: their rows are still
    ``queued``, their messages sit in the broker's unacked set until the visibility timeout (an
    hour). Queued rows with no message waiting in a queue are published again now; a duplicate
    of a message a live worker is about to claim is harmless (the claim is conditional)."""
    from textnlp_jobs.db import repository as repo
    from textnlp_jobs.maintenance.live_messages import live_job_ids

    with factory() as session:
        candidates = repo.unpublished_candidates(session, 0.0, settings.reconcile_batch)
    if not candidates:
        return 0
    waiting = live_job_ids(settings, fresh_seconds=0.0)  # queue lists only, no deliveries
    if waiting is None:
        return 0
    stranded = [c for c in candidates if str(c.id) not in waiting]
    if stranded:
        republish([replace(routing, priority=MAX_PRIORITY) for routing in stranded])
    return len(stranded)


class Liveness:
    """Registration, heartbeat and peer rescue for one device worker process."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], device: Device, models: Sequence[str],
                 republish: Callable[[Sequence[Routing]], None]) -> None:
        self.settings = settings
        self.sessions = factory
        self.device = device
        self.models = list(models)
        self.republish = republish
        self.instance = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> None:
        """Take the device, or raise ``DeviceInUseError`` naming the worker that holds it."""
        try:
            self._register()
        except IntegrityError:  # another worker inserted the device's row first: look again
            self._register()
        log.info("device_registered device=%s instance=%s", self.device.name, self.instance)

    def _register(self) -> None:
        with self.sessions.begin() as session:
            holder = device_workers.register(session, self.device, self.models, self.instance,
                                             self.settings.heartbeat_ttl_seconds)
            if holder is not None:
                raise DeviceInUseError(
                    f"device {self.device.name} is already served by a live worker ({holder.hostname}, "
                    f"pid {holder.pid} on {holder.host}); stop it first or start this one on another device")

    def start(self) -> None:
        """Rescue what a dead predecessor left running, then beat in the background."""
        self._beat_once()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.device.local}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self.sessions.begin() as session:
                device_workers.unregister(session, self.device, self.instance)
        except Exception:  # the ledger may be gone at shutdown; the heartbeat then just expires
            log.warning("device_unregister_failed device=%s", self.device.name, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_seconds):
            try:
                self._beat_once()
            except Exception:  # a ledger outage must not kill the heartbeat; it retries next beat
                log.warning("heartbeat_failed device=%s", self.device.name, exc_info=True)

    def _beat_once(self) -> None:
        with self.sessions.begin() as session:
            still_ours = device_workers.heartbeat(session, self.device, self.instance)
        if not still_ours:
            # Our heartbeat lapsed (a long ledger outage) and another worker took the device:
            # the jobs we hold will be discarded at write time; take the device back if free.
            log.error("device_taken_over device=%s instance=%s", self.device.name, self.instance)
            try:
                self.register()
            except DeviceInUseError:
                return
        rescue_orphans(self.settings, self.sessions, self.republish)
