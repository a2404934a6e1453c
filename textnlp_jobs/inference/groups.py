"""Group commit: many threads each hand in one item; one thread runs the work for all that waited.

A device worker has one task thread per job in flight. Each needs a claim and a result write,
and one statement per job is what made per-job system work cost about 10 ms. ``GroupRunner``
collects what the threads hand in while its previous group runs and runs the next group as one
call, so under load the ledger sees one claim and one write per group, and an idle worker still
answers a lone job at once (a group of one, no waiting window).

Under a steady trickle, though, "what waited while the previous group ran" is one or two items:
a mixed workload's rows finish one or two per decode step, and each freed row lets one more job
in. Each group costs a transaction (about a millisecond of the worker's GIL) whatever its size,
so a runner with ``spacing`` starts a group no sooner than ``spacing`` seconds after the previous
one started, once it is under load: a trickle is gathered into groups of several. After a quiet
spell an item runs at once, and so does the group after it, so a burst that reaches an idle
worker one message first is not split across the spacing (the engine would start that first job
alone). The price is at most ``spacing`` of latency per item, only under load.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GroupRunner(Generic[T, R]):
    """Runs ``work(items) -> results`` (one result per item, in order) once per group.

    ``submit`` is thread-safe and returns a future. When the runner is not started (or already
    stopped) ``submit`` runs a group of one in the caller's thread, so shutdown never strands a
    caller that still has a result to write."""

    def __init__(self, name: str, work: Callable[[Sequence[T]], Sequence[R]], *, max_group: int = 512,
                 spacing: float = 0.0) -> None:
        self.name = name
        self.work = work
        self.max_group = max_group
        self.spacing = spacing  # seconds, at least, from one group's start to the next (see above)
        self._last_started = -math.inf
        self._under_load = False  # the last group came within the spacing of the one before, or waited
        self._pending: list[tuple[T, Future[R]]] = []
        self._changed = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._changed:
            if self._running:
                self._pending.append((item, future))
                self._changed.notify()
                return future
        self._run([(item, future)])
        return future

    def start(self) -> None:
        with self._changed:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"group-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is already handed in, then stop; later items run in their callers' threads."""
        with self._changed:
            self._running = False
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while self._running and not self._pending:
                    self._changed.wait()
                waited = False
                while self._under_load and self._running and len(self._pending) < self.max_group:
                    left = self._last_started + self.spacing - time.monotonic()
                    if left <= 0:
                        break
                    waited = True
                    self._changed.wait(left)
                if not self._pending:
                    return
                group = self._pending[: self.max_group]
                del self._pending[: self.max_group]
            now = time.monotonic()
            self._under_load = waited or now - self._last_started < self.spacing
            self._last_started = now
            self._run(group)

    def _run(self, group: list[tuple[T, Future[R]]]) -> None:
        try:
            results = self.work([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(group)} items")
        except BaseException as error:  # every caller sees the failure; the runner lives on
            log.warning("group_failed runner=%s size=%d error=%s", self.name, len(group), type(error).__name__)
            for _, future in group:
                future.set_exception(error)
            return
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
