"""The system half of one device worker: the life of one job around the engine side.

``DeviceRuntime.run_job`` is what a Celery task thread calls: claim the row, hand the job to the
device's engine side (``engine_side``: in a child process by default, in this process for tests
with stub engines), wait for its own result, write it exactly once. Claims and result writes are
group-committed (``groups.GroupRunner``): the task threads that wait at the same time share one
claim statement and one write statement, and each thread returns (so Celery acks its message)
only after its row is written. It knows nothing of Celery; the task module is a thin shell
around it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import utcnow
from textnlp_jobs.errors import (
    ErrorCode,
    InferenceError,
    JobDroppedError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.inference.engine import Engine
from textnlp_jobs.inference.engine_side import EngineSide, JobSpec, LocalEngineSide
from textnlp_jobs.inference.groups import GroupRunner
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

Republish = Callable[[Sequence[repo.Routing]], None]


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
        self.claims: GroupRunner[uuid.UUID, repo.ClaimOutcome] = GroupRunner("claim", self._claim_group)
        self.writes: GroupRunner[repo.Finished, bool] = GroupRunner("write", self._write_group)

    @property
    def mode(self) -> str:
        return self.engine_side.mode

    def start(self) -> None:
        """Start the engine side (models warm, loop running) before any job arrives."""
        self.claims.start()
        self.writes.start()
        self.engine_side.start()

    def stop(self) -> None:
        self.engine_side.stop()
        self.claims.stop()
        self.writes.stop()

    def run_job(self, job_id: uuid.UUID) -> str:
        """Run one delivery of a job. Returns what happened (a status, or why nothing ran)."""
        outcome = self.claims.submit(job_id).result()
        job = outcome.job
        if job is None:
            log.info("job_not_run job=%s reason=%s", job_id, outcome.reason)
            metrics.JOBS_DROPPED.labels("unknown", outcome.reason).inc()
            return outcome.reason
        if job.model not in self.engine_side.served():
            return self._not_served_here(job)
        metrics.QUEUE_WAIT.labels(job.model).observe((utcnow() - job.created_at).total_seconds())
        try:
            future = self.engine_side.submit((job.id, job.attempt), job.model, JobSpec.of(job))
            done = future.result(timeout=self.settings.max_job_seconds)
        except JobDroppedError:
            return self._dropped(job)
        except WorkerShuttingDownError:
            return self._give_back(job)
        except FutureTimeout:
            return self._failed(job, InferenceError(f"no result within {self.settings.max_job_seconds:.0f}s",
                                                    code=ErrorCode.INFERENCE_TIMEOUT), retry=True)
        except TextNLPError as error:
            return self._failed(job, error, retry=error.retryable)
        result = done.result
        written = self.writes.submit(repo.Finished(job.id, job.attempt, repo.Outcome(
            text=result.text, tokens_generated=result.tokens_generated, mean_logprob=result.mean_logprob,
            model_version=done.model_version, batch_size=done.batch_size,
            queue_wait_seconds=(utcnow() - job.created_at).total_seconds() - done.inference_seconds,
            inference_seconds=done.inference_seconds,
        ))).result()
        if not written:  # cancelled meanwhile, or the lease went to another attempt
            log.info("result_discarded job=%s attempt=%d", job.id, job.attempt)
            return "discarded"
        metrics.JOBS_FINISHED.labels(job.model, "succeeded").inc()
        metrics.JOB_LATENCY.labels(job.model).observe((utcnow() - job.created_at).total_seconds())
        return "succeeded"

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
