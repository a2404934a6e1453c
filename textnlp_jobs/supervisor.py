"""`worker --all-devices`: one child process per device, each restarted when it dies.

A crashed device worker is started again after a delay that doubles with each crash in a row
(reset once it has run for a while), so a worker that dies at start does not spin. A sibling's
crash never stops the others. A child that exits with status 2 (a configuration error, such as
its device already being served by another worker) would fail the same way again: it is not
restarted. The supervisor's own exit status is truthful: 0 only when every child stopped
cleanly when asked, otherwise the status of the first child that did not (128 + N for a child
killed by signal N, as a shell reports it), or 2 when a child was given up on.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

CONFIGURATION_ERROR = 2
STABLE_AFTER_SECONDS = 60.0


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: a child killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Child:
    """One supervised worker and its restart bookkeeping."""

    name: str
    command: list[str]
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes_in_a_row: int = 0
    restart_at: float | None = None
    restarts: int = 0
    given_up: bool = False
    statuses: list[int] = field(default_factory=list)


Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


class Supervisor:
    """Runs ``commands`` (name -> command line) until told to stop; see the module docstring."""

    def __init__(self, commands: Mapping[str, Sequence[str]], *, backoff: tuple[float, float] = (1.0, 60.0),
                 stable_after: float = STABLE_AFTER_SECONDS, poll: float = 0.2, spawn: Spawn | None = None,
                 on_crash: Callable[[Child], None] | None = None) -> None:
        self.children = [Child(name, list(command)) for name, command in commands.items()]
        self.backoff = backoff
        self.stable_after = stable_after
        self.poll = poll
        self.spawn: Spawn = spawn or (lambda command: subprocess.Popen(command))
        self.on_crash = on_crash
        self.stopping = threading.Event()
        self.first_failure: int | None = None

    def _start(self, child: Child) -> None:
        child.process = self.spawn(child.command)
        child.pid = child.process.pid
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("device_worker_started name=%s pid=%d restarts=%d", child.name, child.process.pid, child.restarts)

    def _delay(self, child: Child) -> float:
        first, last = self.backoff
        return float(min(last, first * 2 ** max(0, child.crashes_in_a_row - 1)))

    def _reap(self, child: Child) -> None:
        process = child.process
        if process is None or process.poll() is None:
            return
        status = exit_status(process.returncode)
        child.statuses.append(status)
        child.process = None
        if self.stopping.is_set():
            if status and self.first_failure is None:
                self.first_failure = status
            return
        if status == CONFIGURATION_ERROR:
            child.given_up = True
            self.first_failure = self.first_failure or status
            log.error("device_worker_failed name=%s status=%d restarting=no reason=configuration_error",
                      child.name, status)
            return
        ran = time.monotonic() - child.started_at
        child.crashes_in_a_row = 1 if ran >= self.stable_after else child.crashes_in_a_row + 1
        delay = self._delay(child)
        child.restart_at = time.monotonic() + delay
        child.restarts += 1
        log.error("device_worker_crashed name=%s status=%d ran_s=%.1f restarting_in_s=%.1f",
                  child.name, status, ran, delay)
        if self.on_crash is not None:
            try:
                self.on_crash(child)
            except Exception:  # rescue is best effort; heartbeats and the lease back it up
                log.warning("crash_hook_failed name=%s", child.name, exc_info=True)

    def run(self) -> int:
        """Supervise until stopped (``stop()``, SIGTERM, SIGINT) or every child was given up on."""
        for child in self.children:
            self._start(child)
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                self._reap(child)
                if child.process is None and child.restart_at is not None and now >= child.restart_at:
                    self._start(child)
            if all(child.given_up for child in self.children):
                log.error("device_workers_all_failed count=%d", len(self.children))
                return CONFIGURATION_ERROR
            self.stopping.wait(self.poll)
        return self._shutdown()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every child to stop (warm shutdown on SIGTERM) and end ``run``."""
        self.stopping.set()
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    def _shutdown(self, grace: float = 60.0) -> int:
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            self._reap(child)
        return self.first_failure or 0

    def install_signal_handlers(self) -> None:
        def forward(signum: int, _frame: FrameType | None) -> None:
            self.stop(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)


def supervise(commands: Mapping[str, Sequence[str]], *, backoff: tuple[float, float] = (1.0, 60.0),
              on_crash: Callable[[Child], None] | None = None) -> int:
    """Run and restart the device workers until a signal stops them; returns the exit status."""
    supervisor = Supervisor(commands, backoff=backoff, on_crash=on_crash)
    supervisor.install_signal_handlers()
    return supervisor.run()
