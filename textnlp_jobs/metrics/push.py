"""Getting the process's metrics out: pushed to the Prometheus pushgateway, or served for scraping.

Each worker process (device or maintenance) runs one :class:`Pusher`: a daemon thread that PUTs the
whole registry to ``TEXTNLP_PUSHGATEWAY_URL`` every ``TEXTNLP_PUSH_INTERVAL_SECONDS`` under the
grouping key ``{job, instance}``, the instance naming the node and the device. A clean shutdown
deletes the group; a SIGKILLed worker's group is left behind and ``metrics.expire_groups`` deletes it
once its ``push_time_seconds`` is old. A pushgateway that is down is logged once per outage and tried
again on the next tick: pushing runs on its own thread and never blocks or fails a job.

A maintenance task run outside a worker (``textnlp-jobs maintenance run``) pushes once when it ends,
into a group of its own per node and task, which later runs of that task replace.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway, start_http_server

from textnlp_jobs.metrics.registry import REGISTRY, worker_started
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

# Pushgateway ``job`` label of each kind of pusher. Worker groups are refreshed every interval, so a
# stale one means a dead worker; one-shot groups are only as fresh as the task's last run.
DEVICE_WORKER_JOB = "textnlp_device_worker"
MAINTENANCE_WORKER_JOB = "textnlp_maintenance_worker"
ONESHOT_JOB = "textnlp_maintenance_oneshot"
WORKER_JOBS = (DEVICE_WORKER_JOB, MAINTENANCE_WORKER_JOB)


def instance_name(node: str, role: str) -> str:
    """The ``instance`` grouping label: node and device (or role), e.g. ``gpu-host-1:cuda.0``."""
    return f"{node}:{role}"


class Pusher:
    """Pushes ``registry`` to one pushgateway group on a background thread."""

    def __init__(self, url: str, job: str, instance: str, *, interval: float, timeout: float,
                 registry: CollectorRegistry = REGISTRY) -> None:
        self.url = url
        self.job = job
        self.grouping_key = {"instance": instance}
        self.interval = interval
        self.timeout = timeout
        self.registry = registry
        self.outage = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Pusher:
        self._thread = threading.Thread(target=self._loop, name=f"metrics-pusher-{self.job}", daemon=True)
        self._thread.start()
        log.info("metrics_pusher_started url=%s job=%s instance=%s interval=%.1f",
                 self.url, self.job, self.grouping_key["instance"], self.interval)
        return self

    def push_soon(self) -> None:
        """Ask the thread to push now instead of at the next tick (returns at once)."""
        self._wake.set()

    def push(self) -> bool:
        """Push once now; True on success. A failure is logged once per outage, never raised."""
        with self._lock:
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry,
                                grouping_key=self.grouping_key, timeout=self.timeout)
            except Exception as error:  # any failure: the gateway is down for us, jobs go on
                if not self.outage:
                    self.outage = True
                    log.warning("pushgateway_unreachable url=%s job=%s error=%s (logged once per outage)",
                                self.url, self.job, type(error).__name__)
                return False
            if self.outage:
                self.outage = False
                log.info("pushgateway_reachable_again url=%s job=%s", self.url, self.job)
            return True

    def stop(self, *, delete: bool = True) -> None:
        """Stop the thread; with ``delete``, remove this process's group (a clean shutdown)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout + 1)
        if delete:
            with self._lock:
                try:
                    delete_from_gateway(self.url, job=self.job, grouping_key=self.grouping_key, timeout=self.timeout)
                    log.info("pushgateway_group_deleted job=%s instance=%s", self.job, self.grouping_key["instance"])
                except Exception as error:
                    log.warning("pushgateway_group_not_deleted job=%s error=%s", self.job, type(error).__name__)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.push()
            self._wake.wait(self.interval)
            self._wake.clear()


_process_pusher: Pusher | None = None
_served_port: int | None = None


def start_worker_metrics(settings: Settings, job: str, role: str, *, device: str | None = None) -> Pusher | None:
    """Called once by a worker process: mark the device up, serve ``/metrics`` if a port is set,
    start the pusher if a pushgateway is set, and delete the group on Celery's worker_shutdown."""
    global _process_pusher, _served_port
    if device is not None:
        worker_started(device)
    if settings.metrics_port is not None and _served_port is None:
        start_http_server(settings.metrics_port, registry=REGISTRY)
        _served_port = settings.metrics_port
        log.info("metrics_served port=%d", settings.metrics_port)
    if not settings.pushgateway_url or _process_pusher is not None:
        return _process_pusher
    _process_pusher = Pusher(settings.pushgateway_url, job, instance_name(settings.node_name, role),
                             interval=settings.push_interval_seconds, timeout=settings.push_timeout_seconds).start()
    from celery.signals import worker_shutdown

    worker_shutdown.connect(_on_worker_shutdown, weak=False)
    return _process_pusher


def _on_worker_shutdown(**_: Any) -> None:
    stop_worker_metrics()


def stop_worker_metrics() -> None:
    """Stop this process's pusher and delete its group (idempotent)."""
    global _process_pusher
    pusher, _process_pusher = _process_pusher, None
    if pusher is not None:
        pusher.stop(delete=True)


def push_after_task(settings: Settings, task: str) -> None:
    """A maintenance task finished: push now. In a worker the pusher thread does it; in a one-shot
    process (CLI, a test) one bounded push goes to the task's own group."""
    if _process_pusher is not None:
        _process_pusher.push_soon()
        return
    if not settings.pushgateway_url:
        return
    Pusher(settings.pushgateway_url, ONESHOT_JOB, instance_name(settings.node_name, task),
           interval=settings.push_interval_seconds, timeout=settings.push_timeout_seconds).push()
