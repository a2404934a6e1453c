"""The system half of one device worker: the life of one job around the engine side.

``DeviceRuntime.deliver`` is what the worker's consumer step calls for each message: claim the
row, hand the job to the device's engine side (``engine_side``: in a child process by default,
in this process for tests with stub engines), and write its result exactly once. Claims and
result writes are group-committed (``groups.GroupRunner``): deliveries that arrive together share
one claim statement, results that finish together one write statement, and each message is acked
(``done``) only after its row is written. ``run_job`` is the same with a wait, for a Celery task
thread. It knows nothing of Celery.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import utcnow
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import (
    ErrorCode,
    InferenceError,
    JobDroppedError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.inference.batcher import BatchedResult
from textnlp_jobs.inference.engine import Engine
from textnlp_jobs.inference.engine_side import EngineSide, JobSpec, LocalEngineSide
from textnlp_jobs.inference.groups import GroupRunner
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

Republish = Callable[[Sequence[repo.Routing]], None]
Key = tuple[uuid.UUID, int]  # (job id, attempt)
R = TypeVar("R")


class Done(Protocol):
    """Told a delivered job's outcome once it is in the ledger (the consumer acks then)."""

    def __call__(self, outcome: str, *, requeue: bool = False) -> None: ...


def as_textnlp(error: BaseException) -> TextNLPError:
    return error if isinstance(error, TextNLPError) else InferenceError(
        f"generation failed: {type(error).__name__}: {error}")


class DeviceRuntime:
    """The models and batching loop of one device, and the per-job protocol around them."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 engines: dict[str, Engine] | EngineSide, *, worker_name: str, republish: Republish) -> None:
        self.settings = settings
        self.sessions = factory
        self.worker_name = worker_name
        self.republish = republish
        # A dict of engines runs them in this process (tests, stub engines); a worker passes its
        # engine process (engine_process.RemoteEngineSide).
        self.engine_side: EngineSide = (LocalEngineSide(settings, factory, engines, name=worker_name)
                                        if isinstance(engines, dict) else engines)
        # Claim what arrived together, record what finished together (``deliver``).
        spacing = settings.group_spacing_on(Device.parse(worker_name, settings.node_name).kind)
        self.intake: GroupRunner[tuple[uuid.UUID, Done], None] = GroupRunner(
            "intake", self._start_group, spacing=spacing)
        self.finishing: GroupRunner[tuple[Key, Future[BatchedResult]], None] = GroupRunner(
            "finish", self._finish_group, spacing=spacing)
        self._in_flight: dict[Key, tuple[repo.ClaimedJob, Done, float]] = {}
        self._in_flight_lock = threading.Lock()
        self._claiming = 0
        self._sweeper_stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        # Outcomes told inside it may be acked together (the consumer step installs one that does).
        self.outcomes_together: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext

    @property
    def mode(self) -> str:
        return self.engine_side.mode

    def start(self) -> None:
        """Start the engine side (models warm, loop running) before any job arrives."""
        self.engine_side.start()
        self.intake.start()
        self.finishing.start()
        self._sweeper = threading.Thread(target=self._sweep_overdue, name="overdue-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        """Stop the engine side (what it still holds fails with ``WorkerShuttingDownError`` and
        is given back to the queue), then the group runners after their last groups."""
        self._sweeper_stop.set()
        self.intake.stop()
        self.engine_side.stop()
        self.finishing.stop()

    def run_job(self, job_id: uuid.UUID) -> str:
        """Run one delivery of a job in the caller's thread and return what happened (a status, or
        why nothing ran): ``deliver`` with a wait. What the Celery task calls; device workers
        consume through ``deliver`` directly (generation_consumer.py)."""
        finished: Future[str] = Future()

        def done(outcome: str, *, requeue: bool = False) -> None:  # requeue: the row stays queued,
            finished.set_result(outcome)  # and the reconciler sends it again after its grace

        self.deliver(job_id, done)
        return finished.result()

    # --- group delivery: what a device worker's consumer step drives ----------------------
    def deliver(self, job_id: uuid.UUID, done: Done) -> None:
        """Hand in one delivered job without blocking. ``done(outcome)`` is called once the
        job's outcome is in the ledger, so its message may be acked; ``done(outcome,
        requeue=True)`` when the ledger could not be reached and the message must come back.
        Deliveries that arrive together are claimed in one statement and their results written
        in one, and no thread waits per job: this is what lets one worker process keep a large
        continuous batch fed (one Celery task thread per job cost about 4 ms of worker CPU each)."""
        with self._in_flight_lock:  # counted from now, so a warm shutdown's drain waits for it
            self._claiming += 1
        self.intake.submit((job_id, done))

    def drain(self, timeout: float) -> int:
        """Wait until every delivered job has its outcome (a warm shutdown); returns how many
        were still running when ``timeout`` ran out."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            with self._in_flight_lock:
                left = len(self._in_flight) + self._claiming
            if not left:
                return 0
            time.sleep(0.05)
        with self._in_flight_lock:
            return len(self._in_flight) + self._claiming

    def _start_group(self, deliveries: Sequence[tuple[uuid.UUID, Done]]) -> list[None]:
        """Claim a group of deliveries in one statement and hand the claimed jobs to the engine."""
        try:
            with self.outcomes_together():
                self._claim_and_start(deliveries)
        finally:  # each one is now in flight or has its outcome
            with self._in_flight_lock:
                self._claiming -= len(deliveries)
        return [None] * len(deliveries)

    def _claim_and_start(self, deliveries: Sequence[tuple[uuid.UUID, Done]]) -> None:
        try:
            outcomes = self._with_ledger_retries("claim", lambda: self._claim_group([i for i, _ in deliveries]))
        except Exception:  # the ledger stayed away: the messages come back, nothing was claimed
            for _, done in deliveries:
                done("ledger_unavailable", requeue=True)
            return
        for (job_id, done), outcome in zip(deliveries, outcomes, strict=True):
            job = outcome.job
            try:
                if job is None:
                    done(self._not_claimed(job_id, outcome.reason))
                elif job.model not in self.engine_side.served():
                    done(self._not_served_here(job))
                else:
                    self._start(job, done)
            except Exception:  # this job only; its message comes back (its lease covers the row)
                log.exception("delivery_failed job=%s", job_id)
                done("delivery_failed", requeue=True)

    def _start(self, job: repo.ClaimedJob, done: Done) -> None:
        metrics.QUEUE_WAIT.labels(job.model).observe((utcnow() - job.created_at).total_seconds())
        key = (job.id, job.attempt)
        with self._in_flight_lock:
            self._in_flight[key] = (job, done, time.monotonic())
        try:
            future = self.engine_side.submit(key, job.model, JobSpec.of(job))
        except Exception as error:  # refused at once (a prompt over the limit, stopping)
            future = Future()
            future.set_exception(error)
        future.add_done_callback(lambda generated: self.finishing.submit((key, generated)))

    def _finish_group(self, items: Sequence[tuple[Key, Future[BatchedResult]]]) -> list[None]:
        """Record a group of generations: the successes in one write, the rest one by one; their
        messages are acked together once all are recorded."""
        with self.outcomes_together():
            self._record_group(items)
        return [None] * len(items)

    def _record_group(self, items: Sequence[tuple[Key, Future[BatchedResult]]]) -> None:
        successes: list[tuple[repo.ClaimedJob, Done, BatchedResult]] = []
        for key, generated in items:
            with self._in_flight_lock:
                entry = self._in_flight.pop(key, None)
            if entry is None:  # already finished by the timeout sweep
                continue
            job, done, _ = entry
            error = generated.exception()
            if error is None:
                successes.append((job, done, generated.result()))
            else:
                done(self._recorded(functools.partial(self._unsuccessful, job, as_textnlp(error))))
        if not successes:
            return
        try:
            written = self._with_ledger_retries(
                "write", lambda: self._write_group([self._finished(job, result) for job, _, result in successes]))
        except Exception:  # the lease runs out and the reconciler sends the jobs again
            log.error("results_not_written count=%d", len(successes))
            for _, done, _ in successes:
                done("write_failed")
            return
        for (job, done, _), was_written in zip(successes, written, strict=True):
            done(self._succeeded(job) if was_written else self._discarded(job))

    def _sweep_overdue(self) -> None:
        """Fail (for a retry) every job the engine has held longer than the longest allowed job."""
        while not self._sweeper_stop.wait(min(5.0, self.settings.max_job_seconds / 4)):
            now = time.monotonic()
            with self._in_flight_lock:
                overdue = [(key, entry) for key, entry in self._in_flight.items()
                           if now - entry[2] > self.settings.max_job_seconds]
                for key, _ in overdue:
                    del self._in_flight[key]
            for _, (job, done, _) in overdue:
                done(self._recorded(functools.partial(self._failed, job, self._timeout(), retry=True)))

    def _with_ledger_retries(self, what: str, work: Callable[[], R]) -> R:
        """``work()``, tried again while the ledger is briefly away (a PostgreSQL restart)."""
        delay = 0.2
        for attempt in range(1, 8):
            try:
                return work()
            except Exception as error:
                if attempt == 7:
                    raise
                log.warning("ledger_retry what=%s attempt=%d error=%s", what, attempt, type(error).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _recorded(record: Callable[[], str]) -> str:
        try:
            return record()
        except Exception:  # the ledger is away: the lease runs out and the reconciler retries
            log.exception("outcome_not_recorded")
            return "not_recorded"

    # --- one job's outcome -------------------------------------------------------------------
    def _timeout(self) -> InferenceError:
        return InferenceError(f"no result within {self.settings.max_job_seconds:.0f}s",
                              code=ErrorCode.INFERENCE_TIMEOUT)

    def _not_claimed(self, job_id: uuid.UUID, reason: str) -> str:
        log.info("job_not_run job=%s reason=%s", job_id, reason)
        metrics.JOBS_DROPPED.labels("unknown", reason).inc()
        return reason

    def _unsuccessful(self, job: repo.ClaimedJob, error: TextNLPError) -> str:
        if isinstance(error, JobDroppedError):
            return self._dropped(job)
        if isinstance(error, WorkerShuttingDownError):
            return self._give_back(job)
        return self._failed(job, error, retry=error.retryable)

    def _finished(self, job: repo.ClaimedJob, done: BatchedResult) -> repo.Finished:
        result = done.result
        return repo.Finished(job.id, job.attempt, repo.Outcome(
            text=result.text, tokens_generated=result.tokens_generated, mean_logprob=result.mean_logprob,
            model_version=done.model_version, batch_size=done.batch_size,
            queue_wait_seconds=(utcnow() - job.created_at).total_seconds() - done.inference_seconds,
            inference_seconds=done.inference_seconds, prompt_tokens=done.prompt_tokens,
            finish_reason=result.finish_reason,
        ))

    def _succeeded(self, job: repo.ClaimedJob) -> str:
        metrics.JOBS_FINISHED.labels(job.model, "succeeded").inc()
        metrics.JOB_LATENCY.labels(job.model).observe((utcnow() - job.created_at).total_seconds())
        return "succeeded"

    @staticmethod
    def _discarded(job: repo.ClaimedJob) -> str:
        """Cancelled meanwhile, or the lease went to another attempt: nothing written."""
        log.info("result_discarded job=%s attempt=%d", job.id, job.attempt)
        return "discarded"

    def _claim_group(self, ids: Sequence[uuid.UUID]) -> list[repo.ClaimOutcome]:
        with self.sessions.begin() as session:
            claimed = repo.claim_many(session, ids, self.worker_name, self.settings.lease_seconds)
        seen: set[uuid.UUID] = set()
        out = []
        for job_id in ids:  # the same job twice in one group (a redelivery): only the first runs it
            out.append(claimed[job_id] if job_id not in seen else repo.ClaimOutcome(None, "not_queued"))
            seen.add(job_id)
        return out

    def _write_group(self, results: Sequence[repo.Finished]) -> list[bool]:
        with self.sessions.begin() as session:
            written = repo.write_successes(session, results, self.worker_name)
        return [r.job_id in written for r in results]

    def _dropped(self, job: repo.ClaimedJob) -> str:
        with self.sessions.begin() as session:
            expired = repo.expire_claimed(session, job.id, job.attempt)
        reason = "expired" if expired else "cancelled"
        metrics.JOBS_DROPPED.labels(job.model, reason).inc()
        metrics.JOBS_FINISHED.labels(job.model, reason).inc()
        log.info("job_dropped job=%s reason=%s", job.id, reason)
        return reason

    def _give_back(self, job: repo.ClaimedJob) -> str:
        with self.sessions.begin() as session:
            routing = repo.release(session, job.id, job.attempt)
        if routing is not None:
            self.republish([routing])
        return "released"

    def _not_served_here(self, job: repo.ClaimedJob) -> str:
        """A pinned job for a model this worker does not serve (placement changed after it was
        queued) is handed back, never failed: the attempt is not counted, and the reconciler sends
        it again after its grace period, by when the device may serve the model."""
        with self.sessions.begin() as session:
            repo.release(session, job.id, job.attempt)
        log.warning("job_handed_back job=%s model=%s reason=model_not_on_device device=%s",
                    job.id, job.model, self.worker_name)
        return "released"

    def _failed(self, job: repo.ClaimedJob, error: TextNLPError, *, retry: bool) -> str:
        with self.sessions.begin() as session:
            status = repo.write_failure(session, job.id, job.attempt, error.code, error.message,
                                        self.worker_name, retry=retry)
        metrics.MODEL_ERRORS.labels(job.model, error.code).inc()
        if status == "failed":
            metrics.JOBS_FINISHED.labels(job.model, status).inc()
        log.warning("job_failed job=%s attempt=%d code=%s status=%s", job.id, job.attempt, error.code, status)
        return status or "discarded"
