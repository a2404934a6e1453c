"""The device's single inference loop: gathers compatible jobs into batches for one ``generate``.

Celery task threads call :meth:`MicroBatcher.submit` and block on the returned future; one loop
thread owns the engines, so the device sees one batched call at a time. Jobs are compatible when
they ask for the same model and sampling settings; a batch closes at ``max_batch`` jobs or
``max_wait_ms`` after its oldest job arrived. Before a batch reaches the device, ``drop_filter``
names jobs no longer worth running (cancelled, overdue). Out-of-memory splits the batch in halves
and retries them; any other failure is bisected too, so one bad row fails only itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from textnlp_jobs.errors import (
    InferenceError,
    JobDroppedError,
    OutOfMemoryError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.inference.engine import Engine, EngineRequest, EngineResult
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import BatchingPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchedResult:
    """A job's generation and the batch it rode in."""

    result: EngineResult
    model_version: str
    batch_size: int
    inference_seconds: float
    waited_seconds: float
    # The tokens the model read, chat template and special tokens included: the ledger's
    # prompt_tokens (the producer cannot count a chat job's, nor any without the tokenizer).
    prompt_tokens: int | None = None


@dataclass
class PendingJob:
    job_id: Any
    model: str
    request: EngineRequest
    arrived: float = field(default_factory=time.monotonic)
    future: Future[BatchedResult] = field(default_factory=Future)

    @property
    def key(self) -> Hashable:
        return (self.model, self.request.sampling)


DropFilter = Callable[[Sequence[PendingJob]], set[Any]]


class DeviceLoop:
    """What both batching loops share: the inbox of jobs and of calls that callers on task threads
    hand to the one loop thread of a device. Thread-safe ``submit`` and ``call_on_loop``."""

    def __init__(
        self,
        engines: dict[str, Engine],
        policy_for: Callable[[str], BatchingPolicy],
        *,
        drop_filter: DropFilter | None = None,
        name: str = "device",
    ) -> None:
        self.engines = engines
        self.policy_for = policy_for
        self.drop_filter = drop_filter
        self.name = name
        self._pending: deque[PendingJob] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Results resolved inside it travel on together: the engine process installs its outbox's
        # hold, so a group that finished in one step reaches the worker as one message, and the
        # worker writes it in one statement rather than in whatever pieces its sender caught.
        self.results_together: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext

    # --- the callers' side -----------------------------------------------------------------
    def submit(self, job_id: Any, model: str, request: EngineRequest) -> Future[BatchedResult]:
        return self.submit_many([(job_id, model, request)])[0]

    def submit_many(self, jobs: Sequence[tuple[Any, str, EngineRequest]]) -> list[Future[BatchedResult]]:
        """Queue ``(job id, model, request)`` jobs for the loop, all or none (one lock, one wake-up)."""
        for _, model, _ in jobs:
            if model not in self.engines:
                raise InferenceError(f"model {model!r} is not loaded on {self.name}")
        pending = [PendingJob(job_id, model, request) for job_id, model, request in jobs]
        with self._changed:
            if self._stopping:
                raise WorkerShuttingDownError(f"{self.name} is stopping")
            self._pending.extend(pending)
            self._changed.notify()
        return [job.future for job in pending]

    def call_on_loop(self, function: Callable[[], Any]) -> Future[Any]:
        """Run ``function`` on the loop thread, between batches or steps (e.g. warm-up). Torch work
        done on another thread would start a second OpenMP pool that competes with the loop's on CPUs."""
        future: Future[Any] = Future()
        with self._changed:
            self._calls.append((function, future))
            self._changed.notify()
        return future

    # --- the loop's side -------------------------------------------------------------------
    def _run_calls(self) -> None:
        while True:
            with self._changed:
                if not self._calls:
                    return
                function, future = self._calls.popleft()
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller, who decides
                future.set_exception(error)


class MicroBatcher(DeviceLoop):
    """One per device: static batches. ``start``/``stop`` own the loop thread."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, then fail whatever still waits so its task can be redelivered."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._changed:
            while self._pending:
                self._pending.popleft().future.set_exception(WorkerShuttingDownError(f"{self.name} stopped"))

    # --- the loop's side -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._run_calls()
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as error:  # the loop must outlive any one batch
                log.exception("batch_crashed device=%s size=%d", self.name, len(batch))
                self._fail(batch, InferenceError(f"batch failed: {type(error).__name__}"))

    def _next_batch(self) -> list[PendingJob] | None:
        """Wait for the oldest job's batch to fill or its wait to run out; take it."""
        with self._changed:
            while True:
                if self._stopping:
                    return None
                if self._calls:
                    return []
                if not self._pending:
                    self._changed.wait()
                    continue
                oldest = self._pending[0]
                policy = self.policy_for(oldest.model)
                mates = [p for p in self._pending if p.key == oldest.key][: policy.max_batch]
                remaining = oldest.arrived + policy.max_wait_ms / 1000.0 - time.monotonic()
                if len(mates) >= policy.max_batch or remaining <= 0:
                    chosen = {id(p) for p in mates}
                    self._pending = deque(p for p in self._pending if id(p) not in chosen)
                    return mates
                self._changed.wait(remaining)

    def _run(self, batch: list[PendingJob]) -> None:
        if not batch:  # woken for a call_on_loop, not for jobs
            return
        if self.drop_filter is not None:
            try:
                dropped = self.drop_filter(batch)
            except Exception:  # a ledger hiccup must not stall the device; run them all
                log.exception("drop_filter_failed device=%s", self.name)
                dropped = set()
            if dropped:
                for pending in batch:
                    if pending.job_id in dropped:
                        pending.future.set_exception(JobDroppedError("cancelled or overdue before generation"))
                batch = [p for p in batch if p.job_id not in dropped]
        if batch:
            self._generate(batch)

    def _generate(self, batch: list[PendingJob]) -> None:
        engine = self.engines[batch[0].model]
        started = time.monotonic()
        try:
            results = engine.generate([p.request for p in batch])
        except Exception as error:
            if len(batch) == 1:
                self._fail(batch, error if isinstance(error, TextNLPError)
                           else InferenceError(f"generation failed: {type(error).__name__}: {error}"))
                return
            reason = "out_of_memory" if isinstance(error, OutOfMemoryError) else type(error).__name__
            log.warning("batch_split device=%s size=%d reason=%s", self.name, len(batch), reason)
            half = len(batch) // 2
            self._generate(batch[:half])
            self._generate(batch[half:])
            return
        elapsed = time.monotonic() - started
        metrics.device_loop(engine.model_name, "batch", elapsed, len(batch))
        self._record(engine, batch, results, elapsed)
        with self.results_together():
            for pending, result in zip(batch, results, strict=True):
                pending.future.set_result(BatchedResult(
                    result, engine.model_version, len(batch), elapsed, started - pending.arrived,
                    len(pending.request.prompt_ids),
                ))

    @staticmethod
    def _fail(batch: Sequence[PendingJob], error: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _record(self, engine: Engine, batch: Sequence[PendingJob], results: Sequence[EngineResult],
                elapsed: float) -> None:
        longest_prompt = max(len(p.request.prompt_ids) for p in batch)
        metrics.BATCH_SIZE.labels(engine.model_name).observe(len(batch))
        metrics.batch_finished()
        metrics.INFERENCE_DURATION.labels(
            engine.model_name, engine.model_version, metrics.input_length_bucket(longest_prompt)
        ).observe(elapsed)
        tokens = sum(r.tokens_generated for r in results)
        if elapsed > 0:
            metrics.TOKENS_PER_SECOND.labels(engine.model_name, engine.model_version).set(tokens / elapsed)
        log.debug("batch_done device=%s model=%s size=%d tokens=%d seconds=%.3f",
                  self.name, engine.model_name, len(batch), tokens, elapsed)

