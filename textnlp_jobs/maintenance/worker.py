"""The maintenance worker's two halves, each its own Celery worker process.

``light`` consumes ``textnlp.maintenance`` (reconcile, health, cache: minutes apart, seconds long);
``heavy`` consumes ``textnlp.maintenance.heavy`` (retention, vacuum, reindex, quantization: hours
long). Separate processes rather than one pool: a heavy task holding the pool's threads (or the
GIL in a long Python loop) would delay the 5-minute reconciler.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

from textnlp_jobs.constants import MAINTENANCE_HEAVY_QUEUE, MAINTENANCE_QUEUE

# kind: (queue, threads)
KINDS: dict[str, tuple[str, int]] = {
    "light": (MAINTENANCE_QUEUE, 2),
    "heavy": (MAINTENANCE_HEAVY_QUEUE, 1),
}


def queue_and_threads(kind: str) -> tuple[str, int]:
    return KINDS[kind]


def command(kind: str, loglevel: str) -> list[str]:
    """The command line of one half."""
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
