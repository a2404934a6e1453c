"""The engine half of a device worker in a child process (see ``engine_side`` for why).

The worker (the parent) starts one child per device with ``RemoteEngineSide.spawn``, first thing,
so the child's imports of torch and transformers run beside the worker's own start-up; the child
loads nothing until ``RemoteEngineSide.start`` says so, after the worker has registered its device
(a second worker for a device is refused before it loads anything). The child pins nothing
itself: it inherits the parent's ``CUDA_VISIBLE_DEVICES``, loads the placed models
(``LocalEngineSide.load``), warms them up, says ``ready`` and then serves. Both directions carry
lists, not single items: the parent's sender thread sends every job handed in since its last
send as one message, and the child's sender thread returns every result finished since its last
one (the rows that finished in one decode step or batch always in one message, so the worker
writes them in one statement). Under load a pipe message carries many jobs, and the decode loop
pays for little more than a list append per job.

Lifetimes: the child ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a supervisor's signal to
the process group reaches the worker, which then stops the child in order, after its running
jobs). It exits at once when the pipe closes, so a SIGKILLed worker never leaves a child holding
the GPU; the killed worker's jobs come back through the broker and the liveness rescue as before.
If the child dies, every job waiting on it fails with ``WorkerShuttingDownError`` (its task gives
the job back to the queue) and ``crashed`` is set, so the worker exits non-zero and is restarted.

Metrics recorded in the child (batch sizes, inference durations, tokens/s, memory, last batch
time, the device loop's time by phase: ``ENGINE_METRICS``) travel to the worker as snapshots beside
the results (at most every 50 ms, one 50 ms after a burst of results ends, and once a second
while idle), and the worker serves them from ``EngineMetricsRelay`` in place of its own empty
copies: one process pushes one pushgateway group and serves one ``/metrics``, as before.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from textnlp_jobs import errors
from textnlp_jobs.errors import InferenceError, TextNLPError, WorkerShuttingDownError
from textnlp_jobs.heap import freeze_start_up_heap
from textnlp_jobs.inference.batcher import BatchedResult
from textnlp_jobs.inference.engine_side import JobSpec
from textnlp_jobs.metrics import registry as metrics

log = logging.getLogger(__name__)

# What the engine process records; the worker relays its snapshots (see the module docstring).
ENGINE_METRICS: tuple[Any, ...] = (metrics.INFERENCE_DURATION, metrics.TOKENS_PER_SECOND, metrics.MEMORY_USAGE,
                                   metrics.BATCH_SIZE, metrics.WORKER_LAST_BATCH, metrics.DEVICE_MEMORY_TOTAL,
                                   metrics.DEVICE_LOOP_SECONDS, metrics.DEVICE_LOOP_OPERATIONS,
                                   metrics.DEVICE_LOOP_ROWS)
SNAPSHOT_EVERY = 0.05  # seconds, at most, between two snapshots sent with results
SNAPSHOT_AT_LEAST = 1.0  # seconds between two snapshots when no result goes out


def engine_snapshot() -> list[Any]:
    """The engine metrics' families as this process holds them (picklable)."""
    return [family for metric in ENGINE_METRICS for family in metric.collect()]


class EngineMetricsRelay:
    """A collector in the worker's registry that serves the engine process's latest snapshot."""

    def __init__(self) -> None:
        self._families: list[Any] = []

    def update(self, families: list[Any]) -> None:
        self._families = families

    def collect(self) -> list[Any]:
        return list(self._families)

    def describe(self) -> list[Any]:
        return []  # the names belong to the metrics this relay replaces (unregistered first)

    def install(self) -> None:
        """Stand in for this process's own (unused) copies of the engine metrics."""
        for metric in ENGINE_METRICS:
            try:
                metrics.REGISTRY.unregister(metric)
            except KeyError:  # already replaced (a second engine process in tests)
                pass
        metrics.REGISTRY.register(self)

# Wire format. Parent -> child: ("jobs", [(key, model, spec), ...]) or ("stop",).
# Child -> parent: ("ready", {"mode": ...}), ("failed", error), ("results", [(key, result|None, error|None), ...]).
ErrorPayload = tuple[str, str, str, bool]  # class name, message, code, retryable


def error_payload(error: BaseException) -> ErrorPayload:
    if isinstance(error, TextNLPError):
        return type(error).__name__, error.message, error.code, error.retryable
    return "InferenceError", f"{type(error).__name__}: {error}", errors.ErrorCode.INFERENCE_FAILED, False


def error_from(payload: ErrorPayload) -> TextNLPError:
    """Rebuild an error sent by the child: its own class where that takes ``(message, code=)``
    (JobDroppedError, WorkerShuttingDownError, OutOfMemoryError, ...), else a ``TextNLPError``
    carrying the same code, message and retryability."""
    name, message, code, retryable = payload
    cls = getattr(errors, name, None)
    error: TextNLPError
    try:
        if not (isinstance(cls, type) and issubclass(cls, TextNLPError)):
            raise TypeError(name)
        error = cls(message, code=code)
    except TypeError:
        error = TextNLPError(message, code=code)
    error.retryable = retryable
    return error


class _Outbox:
    """Items handed in by many threads, taken out as one list by a sender thread."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._holds = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Items put inside the block are taken together: ``take_all`` waits for its end."""
        with self._changed:
            self._holds += 1
        try:
            yield
        finally:
            with self._changed:
                self._holds -= 1
                if self._items and not self._holds:
                    self._changed.notify()

    def put(self, item: Any) -> None:
        with self._changed:
            self._items.append(item)
            if not self._holds:  # inside a block, its end wakes the sender once (not once per item)
                self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def take_all(self, timeout: float | None = None) -> list[Any] | None:
        """Everything handed in so far, waiting for at least one and for the end of any ``held``
        block (an empty list after ``timeout``); None once closed and empty."""
        with self._changed:
            while (not self._items or self._holds) and not self._closed:
                if not self._changed.wait(timeout) and timeout is not None:
                    return []
            if not self._items:
                return None
            items = list(self._items)
            self._items.clear()
            return items


class RemoteEngineSide:
    """An ``EngineSide`` whose engines and loop run in a child process."""

    def __init__(self, device: str, references: Sequence[str], *, torch_threads: int | None = None,
                 loglevel: str = "INFO", start_timeout: float = 900.0) -> None:
        self.device = device
        self.references = list(references)
        self.torch_threads = torch_threads
        self.loglevel = loglevel
        self.start_timeout = start_timeout
        self.mode = "unknown"
        self.crashed = False
        self._names: frozenset[str] = frozenset()
        self._futures: dict[Any, Future[BatchedResult]] = {}
        self._lock = threading.Lock()
        self._outbox = _Outbox()
        self._conn: Connection | None = None
        self._process: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.relay = EngineMetricsRelay()

    def served(self) -> frozenset[str]:
        return self._names

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def spawn(self) -> None:
        """Start the child now, loading nothing: it imports torch and transformers (most of a
        worker's start-up on a CPU) while the worker starts beside it, then waits for ``start``."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        parent_end, child_end = context.Pipe(duplex=True)
        self._process = context.Process(
            target=serve, name=f"engine-{self.device}", daemon=True,
            args=(child_end, self.device, self.references, self.torch_threads, self.loglevel))
        self._process.start()
        child_end.close()
        self._conn = parent_end

    def start(self) -> None:
        """Start the child (unless ``spawn`` did), have it load its models and wait until they are
        loaded and warm; a child that could not load them raises its own error here (e.g.
        ``ModelCorruptError``)."""
        from textnlp_jobs.inference.registry import parse_reference

        self.spawn()
        parent_end = self._conn
        assert parent_end is not None
        with contextlib.suppress(OSError):  # a child that died importing: its exit is reported below
            parent_end.send(("load",))
        if not parent_end.poll(self.start_timeout):
            self._process.kill()
            raise InferenceError(f"engine process for {self.device} not ready within {self.start_timeout:.0f}s")
        try:
            message = parent_end.recv()
        except EOFError:
            self._process.join(5)
            raise InferenceError(f"engine process for {self.device} exited while starting "
                                 f"(exit code {self._process.exitcode})") from None
        if message[0] == "failed":
            self._process.join(10)
            raise error_from(message[1])
        self.mode = message[1]["mode"]
        self.relay.install()
        self._names = frozenset(parse_reference(r)[0] for r in self.references)
        self._threads = [threading.Thread(target=self._send_loop, name=f"engine-send-{self.device}", daemon=True),
                         threading.Thread(target=self._receive_loop, name=f"engine-recv-{self.device}", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("engine_process_ready device=%s pid=%s mode=%s", self.device, self._process.pid, self.mode)

    def submit(self, key: Any, model: str, spec: JobSpec) -> Future[BatchedResult]:
        if model not in self._names:
            raise InferenceError(f"model {model!r} is not loaded on {self.device}")
        future: Future[BatchedResult] = Future()
        with self._lock:
            if self._stopping or self.crashed:
                raise WorkerShuttingDownError(f"{self.device} engine is stopping")
            self._futures[key] = future
        self._outbox.put((key, model, spec))
        return future

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the child to stop: it finishes the step in flight, fails what still waits with
        ``WorkerShuttingDownError`` (sent back like any result) and exits."""
        with self._lock:
            self._stopping = True
        self._outbox.close()
        for thread in self._threads:
            thread.join(timeout)
        if not self._threads and self._process is not None:
            # Spawned, never started: it holds no model yet, and may still be importing for seconds.
            self._process.kill()
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                log.warning("engine_process_killed device=%s", self.device)
                self._process.kill()
                self._process.join(5)
        self._fail_waiting(WorkerShuttingDownError(f"{self.device} engine stopped"))

    # --- threads -----------------------------------------------------------------------------
    def _send_loop(self) -> None:
        assert self._conn is not None
        while True:
            jobs = self._outbox.take_all()
            try:
                self._conn.send(("jobs", jobs) if jobs is not None else ("stop",))
            except (OSError, ValueError):  # the child is gone; the receiver reports it
                return
            if jobs is None:
                return

    def _receive_loop(self) -> None:
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "metrics":
                self.relay.update(message[1])
                continue
            if message[0] != "results":
                continue
            for key, result, error in message[1]:
                with self._lock:
                    future = self._futures.pop(key, None)
                if future is None:
                    continue
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error_from(error))
        with self._lock:
            stopping = self._stopping
        if not stopping:
            self.crashed = True
            code = self._process.exitcode if self._process is not None else None
            log.error("engine_process_died device=%s exit_code=%s", self.device, code)
            # Celery's tasks give their jobs back; the worker stops and exits non-zero.
            self._fail_waiting(WorkerShuttingDownError(f"{self.device} engine process died"))
            os.kill(os.getpid(), signal.SIGTERM)

    def _fail_waiting(self, error: BaseException) -> None:
        with self._lock:
            waiting, self._futures = self._futures, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)


# --- the child -------------------------------------------------------------------------------
def serve(conn: Connection, device: str, references: list[str], torch_threads: int | None, loglevel: str) -> None:
    """The child's main: load, say ready, then move jobs in and results out until told to stop
    or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/engine] %(message)s")
    from textnlp_jobs.settings import get_settings

    settings = get_settings()
    _import_ahead()
    try:
        if conn.recv()[0] != "load":
            return
    except (EOFError, OSError):  # the worker stopped (or was refused) before it needed us
        return
    try:
        side = _load(settings, device, references, torch_threads)
    except BaseException as error:
        if not isinstance(error, TextNLPError):  # ours are one line, printed by the worker
            log.exception("engine_load_failed device=%s", device)
        conn.send(("failed", error_payload(error)))
        conn.close()
        sys.exit(1)
    from textnlp_jobs.devices import Device

    metrics.worker_started(Device.parse(device, settings.node_name).local)  # labels the last-batch time
    freeze_start_up_heap("engine")  # a full collection must not walk the models at every pass
    results = _Outbox()
    side.batcher.results_together = results.held  # a group finished in one step leaves as one message
    sender = threading.Thread(target=_send_results, args=(conn, results), name="engine-results", daemon=True)
    sender.start()
    conn.send(("ready", {"mode": side.mode}))

    def finished(key: Any, future: Future[BatchedResult]) -> None:
        error = future.exception()
        results.put((key, None, error_payload(error)) if error is not None else (key, future.result(), None))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the worker is gone: nobody waits for these results
            os._exit(0)
        if message[0] == "stop":
            break
        # A prompt over the limit or a tokenizer error fails its own future only.
        try:
            futures = side.submit_many(message[1])
        except Exception as error:  # not one job's fault: these jobs fail, the process serves on
            log.exception("engine_submit_failed device=%s count=%d", device, len(message[1]))
            for key, _, _ in message[1]:
                results.put((key, None, error_payload(error)))
            continue
        for (key, _, _), future in zip(message[1], futures, strict=True):
            future.add_done_callback(functools.partial(finished, key))
    side.stop()  # fails what still runs or waits with WorkerShuttingDownError, through `finished`
    results.close()
    sender.join(30)
    conn.close()


def _import_ahead() -> None:
    """What loading any model imports, and takes seconds to (torch, and transformers' modelling and
    generation code), imported while the worker registers its device; a model's own modelling
    module is small beside them. A failure here is left for ``_load`` to report as its own."""
    for module in ("torch", "transformers.modeling_utils", "transformers.generation.utils"):
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def _load(settings: Any, device: str, references: list[str], torch_threads: int | None) -> Any:
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.devices import Device
    from textnlp_jobs.inference.engine_side import LocalEngineSide, prepare_loop_process

    prepare_loop_process(torch_threads)
    dev = Device.parse(device, settings.node_name)
    side = LocalEngineSide.load(settings, session_factory(settings), dev, references)
    side.start()
    return side


def _send_results(conn: Connection, results: _Outbox) -> None:
    """Send results as they finish, each time with a metrics snapshot if the last one is at least
    ``SNAPSHOT_EVERY`` old. Results sent without one are followed by one ``SNAPSHOT_EVERY`` after
    the last, so what the worker serves trails the engine by that much, not by a second, once a
    burst ends. With nothing to send, one every ``SNAPSHOT_AT_LEAST`` (gauges move while idle)."""
    last_snapshot = 0.0
    owed = False  # results went out since the last snapshot
    while True:
        wait = max(0.0, last_snapshot + SNAPSHOT_EVERY - time.monotonic()) if owed else SNAPSHOT_AT_LEAST
        batch = results.take_all(timeout=wait)
        try:
            if batch:
                conn.send(("results", batch))
                owed = True
            now = time.monotonic()
            if batch is None or now - last_snapshot >= SNAPSHOT_EVERY:
                conn.send(("metrics", engine_snapshot()))
                last_snapshot, owed = now, False
        except (OSError, ValueError):  # the worker is gone
            os._exit(0)
        if batch is None:
            return
