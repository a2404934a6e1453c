"""A device worker's liveness: it registers its device, refuses to start when another live
worker already serves it, beats every few seconds, and rescues the running jobs of dead workers
(its own killed predecessor's first of all) so they run again within seconds, not a lease."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import device_workers
from textnlp_jobs.db.repository import Routing
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import DeviceInUseError
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)


def rescue_orphans(settings: Settings, factory: sessionmaker[Session],
                   republish: Callable[[Sequence[Routing]], None]) -> int:
    """Requeue and republish the running jobs of workers that are gone. Returns how many."""
    with factory.begin() as session:
        rescued = device_workers.rescue_orphans(session, settings.heartbeat_ttl_seconds)
    if rescued:
        republish(rescued)
        log.warning("orphaned_jobs_rescued count=%d", len(rescued))
    return len(rescued)


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
