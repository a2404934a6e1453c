"""The device's continuous (iteration-level) batching loop: the ``mode: continuous`` of a model.

Same interface as ``batcher.MicroBatcher`` (``submit``, ``call_on_loop``, ``start``, ``stop``).
One loop thread owns every model's running batch (``decoders.Decoder``). Each turn it admits
waiting jobs into the free rows of their model's batch (an idle device asks ``drop_filter`` first,
so cancelled or overdue jobs never reach it), then runs one decode step of every non-empty batch;
a row that finished leaves at once and its job's future is resolved. For waiting and decoding jobs
``drop_filter`` is asked every ``recheck_seconds`` by a checker thread (so the ledger round trip
never stalls a decode step), and a job cancelled or past its deadline mid-decode stops at the next
step. An empty batch waits up to ``max_wait_ms`` for company so the first prefill is batched. A
running batch takes newcomers when joining pays (``_Running.should_join``): a join stalls every
running row for a fixed cost beyond the newcomers' own prefill (``JoinCost``, fitted from this
device's own timings), while a free row left empty loses one row of work per step, so waiting jobs
join once the row-steps lost to free rows since the last join reach that cost, or once free rows
have stood empty beside waiting jobs for ``max_wait_ms`` and at least ``MAX_JOIN_WAIT_STEPS``
steps. Out-of-memory while admitting splits the newcomers (one that still does not fit beside the
running rows waits for them); while decoding, the newest half of the rows go back to the head of
the queue (they restart from their prompt, with fresh seeded generators) and the batch holds at
most the rows it kept until it empties. A row that alone runs out of memory fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from textnlp_jobs.errors import (
    InferenceError,
    JobDroppedError,
    OutOfMemoryError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.inference.batcher import BatchedResult, DeviceLoop, DropFilter, PendingJob
from textnlp_jobs.inference.decoders import Decoder
from textnlp_jobs.inference.engine import Engine
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import BatchingPolicy

log = logging.getLogger(__name__)

# Until this device has timed a few joins of different sizes, a join's fixed cost is taken to be
# half of what it took (the other half being the newcomers' own prefill, which no schedule avoids).
ASSUMED_FIXED_SHARE = 0.5
# Weight of the newest timing in the running averages.
TIMING_WEIGHT = 0.1
# However long joining takes to pay, a newcomer that found free rows waits at most this many decode
# steps (or max_wait_ms, if longer): a lone job beside long-running rows is not held for minutes.
MAX_JOIN_WAIT_STEPS = 16


class JoinCost:
    """What one join stalls the running rows for, beyond the newcomers' own prefill.

    A join of ``g`` newcomers takes about ``fixed + per_row * g``: the per-row part is prefill
    work every job needs once whenever it joins, the fixed part (launches, the cache merge, the
    compaction) is what each extra join adds. Both come from a running least-squares fit of join
    time on group size, so the rule adapts to a launch-bound GPU (mostly fixed) and a compute-bound
    CPU (mostly per row) alike."""

    def __init__(self) -> None:
        self.step_seconds: float | None = None  # running average of one decode step
        self._mean_rows = self._mean_seconds = self._mean_rows_sq = self._mean_product = 0.0
        self._joins = 0

    def step_timed(self, seconds: float) -> None:
        previous = self.step_seconds
        self.step_seconds = seconds if previous is None else previous + TIMING_WEIGHT * (seconds - previous)

    def join_timed(self, rows: int, seconds: float) -> None:
        weight = 1.0 if not self._joins else TIMING_WEIGHT
        self._joins += 1
        self._mean_rows += weight * (rows - self._mean_rows)
        self._mean_seconds += weight * (seconds - self._mean_seconds)
        self._mean_rows_sq += weight * (rows * rows - self._mean_rows_sq)
        self._mean_product += weight * (rows * seconds - self._mean_product)

    def fixed_seconds(self) -> float | None:
        """The fitted fixed part of a join, or None before any join was timed."""
        if not self._joins:
            return None
        variance = self._mean_rows_sq - self._mean_rows ** 2
        if self._joins < 4 or variance < 1.0:  # group sizes too alike to separate the two parts
            return ASSUMED_FIXED_SHARE * self._mean_seconds
        per_row = (self._mean_product - self._mean_rows * self._mean_seconds) / variance
        per_row = min(max(per_row, 0.0), self._mean_seconds / max(self._mean_rows, 1.0))
        return self._mean_seconds - per_row * self._mean_rows

    def in_steps(self) -> float:
        """The fixed part in decode steps (1 until both have been timed)."""
        fixed = self.fixed_seconds()
        if fixed is None or not self.step_seconds:
            return 1.0
        return fixed / self.step_seconds


class _Running:
    """One model's running batch and the jobs riding in it."""

    def __init__(self, engine: Engine, decoder: Decoder) -> None:
        self.engine = engine
        self.decoder = decoder
        self.jobs: dict[Hashable, tuple[PendingJob, float, int]] = {}  # key -> (job, admitted at, batch size)
        self.cap: int | None = None  # lowered after out-of-memory until the batch empties
        self.tokens = 0
        # tokens/s is reported over windows of about a second: a running batch has no single
        # generate call to divide by, and a per-job figure would ignore the rows beside it.
        self.window_started = time.monotonic()
        self.window_tokens = 0
        self.join_cost = JoinCost()
        self.idle_row_steps = 0.0  # free rows left empty while jobs waited, since the last join
        self.idle_since = 0.0  # when the first of those was left empty

    def should_join(self, fillable: int, now: float, max_wait: float) -> bool:
        """Whether ``fillable`` waiting jobs (there are that many free rows) join before the next
        step. Each step they wait loses ``fillable`` rows of work; a join stalls every running row
        for its fixed cost. Joining once the loss so far reaches that cost is never worse than twice
        the best schedule (the ski-rental rule) and needs no forecast of arrivals or of when rows
        finish: uniform jobs come to join in large groups, mixed ones as enough rows free up."""
        if not self.idle_row_steps:
            self.idle_since = now
        cost = self.join_cost
        join = (not self.jobs  # nothing running: a start, not a join
                or now - self.idle_since >= max(max_wait, MAX_JOIN_WAIT_STEPS * (cost.step_seconds or 0.0))
                or self.idle_row_steps + fillable >= cost.in_steps() * len(self.jobs))
        self.idle_row_steps = 0.0 if join else self.idle_row_steps + fillable
        return join

    def count_tokens(self, tokens: int, now: float) -> None:
        """Add finished tokens; publish the window's rate once it is a second long."""
        self.tokens += tokens
        self.window_tokens += tokens
        elapsed = now - self.window_started
        if elapsed >= 1.0:
            metrics.TOKENS_PER_SECOND.labels(self.engine.model_name, self.engine.model_version).set(
                self.window_tokens / elapsed)
            self.window_started, self.window_tokens = now, 0


class ContinuousBatcher(DeviceLoop):
    """One per device: iteration-level batching. ``start``/``stop`` own the loop thread."""

    def __init__(
        self,
        engines: dict[str, Engine],
        policy_for: Callable[[str], BatchingPolicy],
        *,
        drop_filter: DropFilter | None = None,
        name: str = "device",
        recheck_seconds: float = 0.25,
    ) -> None:
        super().__init__(engines, policy_for, drop_filter=drop_filter, name=name)
        self.recheck_seconds = recheck_seconds
        self._running: dict[str, _Running] = {}
        self._checker: threading.Thread | None = None
        self._stop_checking = threading.Event()
        self._gone: set[Any] = set()  # job ids the checker found cancelled or overdue
        self._riding: list[PendingJob] = []  # the loop's latest list of jobs in running batches

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"continuous-{self.name}", daemon=True)
        self._thread.start()
        if self.drop_filter is not None:
            self._checker = threading.Thread(target=self._check_loop, name=f"drop-check-{self.name}", daemon=True)
            self._checker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the step in flight; every job still decoding or waiting is failed with
        ``WorkerShuttingDownError`` so its task gives the job back to the queue."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_checking.set()
        if self._checker is not None:
            self._checker.join(timeout)
        error = WorkerShuttingDownError(f"{self.name} stopped")
        with self._changed:
            while self._pending:
                self._set_error(self._pending.popleft(), error)
            for running in self._running.values():
                for job, _, _ in running.jobs.values():
                    self._set_error(job, error)
                running.jobs.clear()

    # --- the loop's side -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            admissions = self._wait_for_work()
            if admissions is None:
                return
            try:
                self._run_calls()
                self._drop_gone()
                self._admit(admissions)
                for model, running in list(self._running.items()):
                    if running.jobs:
                        self._step(model, running)
                self._riding = [job for running in self._running.values() for job, _, _ in running.jobs.values()]
            except BaseException as error:  # the loop must outlive any one step
                log.exception("continuous_loop_crashed device=%s", self.name)
                self._fail_everything(InferenceError(f"decode loop failed: {type(error).__name__}"))

    def _busy(self) -> bool:
        return any(running.jobs for running in self._running.values())

    def _wait_for_work(self) -> list[PendingJob] | None:
        """The jobs to admit now (possibly none while rows decode); None when stopping."""
        with self._changed:
            while True:
                if self._stopping:
                    return None
                busy = self._busy()
                if self._calls or busy:
                    return self._take_admissions()
                if not self._pending:
                    self._changed.wait()
                    continue
                oldest = self._pending[0]
                policy = self.policy_for(oldest.model)
                same = sum(1 for p in self._pending if p.model == oldest.model)
                remaining = oldest.arrived + policy.max_wait_ms / 1000.0 - time.monotonic()
                if same >= policy.max_batch or remaining <= 0:
                    return self._take_admissions()
                self._changed.wait(remaining)

    def _take_admissions(self) -> list[PendingJob]:
        free: dict[str, int] = {}
        taken: list[PendingJob] = []
        left: deque[PendingJob] = deque()
        waiting: dict[str, int] = {}
        for pending in self._pending:
            waiting[pending.model] = waiting.get(pending.model, 0) + 1
        now = time.monotonic()
        for pending in self._pending:
            if pending.model not in free:
                running = self._running.get(pending.model)
                if running is not None and running.engine is not self.engines.get(pending.model):
                    # A new version was swapped in (versions.py): the rows decoding finish on the
                    # old one, newcomers wait for them and then start a batch on the new one.
                    if running.jobs:
                        free[pending.model] = 0
                        left.append(pending)
                        continue
                    del self._running[pending.model]
                    running = None
                limit = self.policy_for(pending.model).max_batch
                if running is not None and running.cap is not None:
                    limit = min(limit, running.cap)
                rows = len(running.jobs) if running else 0
                free[pending.model] = limit - rows
                fillable = min(free[pending.model], waiting[pending.model])
                max_wait = self.policy_for(pending.model).max_wait_ms / 1000.0
                if running is not None and fillable > 0 and not running.should_join(fillable, now, max_wait):
                    free[pending.model] = 0
            if free[pending.model] > 0:
                free[pending.model] -= 1
                taken.append(pending)
            else:
                left.append(pending)
        self._pending = left
        return taken

    def _dropped(self, jobs: Sequence[PendingJob]) -> set[Any]:
        if self.drop_filter is None or not jobs:
            return set()
        try:
            return self.drop_filter(jobs)
        except Exception:  # a ledger hiccup must not stall the device; run them all
            log.exception("drop_filter_failed device=%s", self.name)
            return set()

    def _admit(self, admissions: list[PendingJob]) -> None:
        # An idle device asks the ledger now (nothing waits on it); a busy one relies on the
        # checker thread, so a ledger round trip never stalls the rows decoding.
        dropped = set() if self._busy() else self._dropped(admissions)
        by_model: dict[str, list[PendingJob]] = {}
        for pending in admissions:
            if pending.job_id in dropped:
                self._set_error(pending, JobDroppedError("cancelled or overdue before generation"))
            else:
                by_model.setdefault(pending.model, []).append(pending)
        for model, jobs in by_model.items():
            running = self._running.get(model)
            if running is None:
                engine = self.engines[model]
                running = self._running[model] = _Running(engine, engine.decoder())  # type: ignore[attr-defined]
            self._admit_group(running, jobs)

    def _admit_group(self, running: _Running, jobs: list[PendingJob]) -> None:
        started = time.monotonic()
        joining = bool(running.jobs)
        try:
            finished = running.decoder.admit([(id(job), job.request) for job in jobs])
        except Exception as error:
            if len(jobs) == 1 and isinstance(error, OutOfMemoryError) and running.jobs:
                # No room beside the rows already decoding: wait for them, do not fail the job.
                running.cap = len(running.jobs)
                with self._changed:
                    self._pending.appendleft(jobs[0])
                return
            if len(jobs) == 1:
                self._set_error(jobs[0], error if isinstance(error, TextNLPError)
                                else InferenceError(f"generation failed: {type(error).__name__}: {error}"))
                return
            reason = "out_of_memory" if isinstance(error, OutOfMemoryError) else type(error).__name__
            log.warning("admission_split device=%s size=%d reason=%s", self.name, len(jobs), reason)
            half = len(jobs) // 2
            self._admit_group(running, jobs[:half])
            self._admit_group(running, jobs[half:])
            return
        elapsed = time.monotonic() - started
        metrics.device_loop(running.engine.model_name, "join" if joining else "start", elapsed, len(jobs))
        if joining:
            running.join_cost.join_timed(len(jobs), elapsed)
        size = len(running.decoder)
        for job in jobs:
            running.jobs[id(job)] = (job, started, size + len(finished))
        metrics.BATCH_SIZE.labels(running.engine.model_name).observe(size + len(finished))
        self._finish(running, finished)

    def _step(self, model: str, running: _Running) -> None:
        started = time.monotonic()
        rows = len(running.jobs)
        try:
            finished = running.decoder.step()
            elapsed = time.monotonic() - started
            metrics.device_loop(running.engine.model_name, "step", elapsed, rows)
            running.join_cost.step_timed(elapsed)
        except OutOfMemoryError:
            self._shrink(model, running)
            return
        except Exception as error:
            log.exception("decode_step_failed device=%s model=%s rows=%d", self.name, model, len(running.jobs))
            failure = error if isinstance(error, TextNLPError) else InferenceError(
                f"decode step failed: {type(error).__name__}")
            running.decoder.evict(set(running.jobs))
            for job, _, _ in running.jobs.values():
                self._set_error(job, failure)
            running.jobs.clear()
            return
        self._finish(running, finished)

    def _shrink(self, model: str, running: _Running) -> None:
        keys = running.decoder.keys()
        if len(keys) <= 1:
            running.decoder.evict(set(keys))
            for key in keys:
                job, _, _ = running.jobs.pop(key)
                self._set_error(job, OutOfMemoryError("out of memory decoding one row"))
            return
        back = keys[len(keys) // 2:]
        running.decoder.evict(set(back))
        running.cap = len(keys) - len(back)
        log.warning("decode_shrink device=%s model=%s rows=%d requeued=%d", self.name, model, len(keys), len(back))
        with self._changed:
            for key in reversed(back):
                job, _, _ = running.jobs.pop(key)
                self._pending.appendleft(job)

    def _finish(self, running: _Running, finished: list[tuple[Hashable, Any]]) -> None:
        now = time.monotonic()
        if finished:  # most steps finish none: only then is the results block opened
            metrics.batch_finished()
            with self.results_together():
                for key, result in finished:
                    job, admitted, size = running.jobs.pop(key)
                    running.count_tokens(result.tokens_generated, now)
                    # No single generate call here: a job's time in the running batch is its inference time.
                    metrics.INFERENCE_DURATION.labels(
                        running.engine.model_name, running.engine.model_version,
                        metrics.input_length_bucket(len(job.request.prompt_ids))).observe(now - admitted)
                    if not job.future.done():
                        job.future.set_result(BatchedResult(
                            result, running.engine.model_version, size, now - admitted,
                            admitted - job.arrived, len(job.request.prompt_ids)))
        if not running.jobs:
            running.cap = None
            # An idle device is not a slow one: the next window starts with the next batch.
            running.window_started, running.window_tokens = now, 0

    def _check_loop(self) -> None:
        """Every ``recheck_seconds``: ask the ledger which waiting or decoding jobs were cancelled
        or passed their deadline; the loop drops them at its next step."""
        while not self._stop_checking.wait(self.recheck_seconds):  # its own wake-up, not the loop's
            with self._changed:
                jobs = list(self._pending) + list(self._riding)
            gone = self._dropped(jobs)
            if gone:
                with self._changed:
                    self._gone |= gone

    def _drop_gone(self) -> None:
        with self._changed:
            gone, self._gone = self._gone, set()
            if not gone:
                return
            waiting = [p for p in self._pending if p.job_id in gone]
            self._pending = deque(p for p in self._pending if p.job_id not in gone)
        for pending in waiting:
            self._set_error(pending, JobDroppedError("cancelled or overdue before generation"))
        for running in self._running.values():
            keys = {key for key, (job, _, _) in running.jobs.items() if job.job_id in gone}
            if keys:
                running.decoder.evict(keys)
                for key in keys:
                    job, _, _ = running.jobs.pop(key)
                    self._set_error(job, JobDroppedError("cancelled or overdue while decoding"))
                if not running.jobs:
                    running.cap = None

    def _fail_everything(self, error: BaseException) -> None:
        for running in self._running.values():
            running.decoder.evict(set(running.jobs))
            for job, _, _ in running.jobs.values():
                self._set_error(job, error)
            running.jobs.clear()

    @staticmethod
    def _set_error(job: PendingJob, error: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(error)
