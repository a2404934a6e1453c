"""The maintenance worker: two Celery worker processes, so a long task never starves a short one.

``light`` consumes ``textnlp.maintenance`` (reconcile, health, cache: minutes apart, seconds long);
``heavy`` consumes ``textnlp.maintenance.heavy`` (retention, vacuum, reindex, quantization: hours
long). Separate processes rather than one pool: a heavy task holding every thread (or the GIL in a
long loop) of a shared pool would delay the 5-minute reconciler.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any, Literal

from textnlp_jobs.constants import MAINTENANCE_HEAVY_QUEUE, MAINTENANCE_QUEUE
from textnlp_jobs.settings import get_settings

Kind = Literal["light", "heavy"]
KINDS: dict[Kind, tuple[str, str, int]] = {
    # kind: (queue, hostname prefix, threads)
    "light": (MAINTENANCE_QUEUE, "maintenance", 2),
    "heavy": (MAINTENANCE_HEAVY_QUEUE, "maintenance-heavy", 1),
}


def run_one(kind: Kind, *, loglevel: str = "INFO", concurrency: int | None = None) -> None:
    """Run one maintenance worker in this process (blocks)."""
    from textnlp_jobs.celery_app import app

    queue, hostname, threads = KINDS[kind]
    settings = get_settings()
    from textnlp_jobs.worker_main import quiet_flags

    app.worker_main([
        *quiet_flags(loglevel), "worker", "--pool=threads", f"--concurrency={concurrency or threads}",
        f"--queues={queue}",
        f"--hostname={hostname}@{settings.node_name}", f"--loglevel={loglevel}",
        "--without-gossip", "--without-mingle",
    ])


def command(kind: Kind, loglevel: str) -> list[str]:
    return [sys.executable, "-m", "textnlp_jobs.worker_main", "maintenance", "--only", kind, "--loglevel", loglevel]


def run_both(*, loglevel: str = "INFO") -> int:
    """Start the light and the heavy worker as child processes and supervise them: a signal is
    passed on to both; when one exits the other is stopped. Returns the exit status."""
    children = [subprocess.Popen(command(kind, loglevel)) for kind in KINDS]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return max(abs(int(child.returncode or 0)) for child in children)
