"""One device's runtime: its loaded models, its batching loop, and the life of one job on it.

``DeviceRuntime.run_job`` is what a Celery task thread calls: claim the row, hand the job to the
batching loop, wait for its own result, write it exactly once. Claims and result writes are
group-committed (``groups.GroupRunner``): the task threads that wait at the same time share one
claim statement and one write statement, and each thread returns (so Celery acks its message)
only after its row is written. It knows nothing of Celery; the task module is a thin shell
around it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import utcnow
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import (
    ErrorCode,
    InferenceError,
    InputError,
    JobDroppedError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.inference import store
from textnlp_jobs.inference.batcher import MicroBatcher, PendingJob
from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import Engine, EngineRequest, SamplingParams
from textnlp_jobs.inference.groups import GroupRunner
from textnlp_jobs.inference.versions import ModelWatcher
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

Republish = Callable[[Sequence[repo.Routing]], None]


def load_engines(settings: Settings, factory: sessionmaker[Session], device: Device,
                 models: Sequence[str]) -> dict[str, Engine]:
    """Load every model placed on ``device`` once (``DeviceRuntime.start`` warms them up). A
    placement reference ``small@int8`` loads that variant under the model's own name (``small``).
    A corrupt version is refused here with a clear error (``ModelCorruptError``)."""
    return {name: engine for name, (engine, _) in load_resolved(settings, factory, device, models).items()}


def load_resolved(settings: Settings, factory: sessionmaker[Session], device: Device,
                  models: Sequence[str]) -> dict[str, tuple[Engine, store.ResolvedModel]]:
    """``load_engines`` with the registry's answer for each model (its version's id)."""
    loaded: dict[str, tuple[Engine, store.ResolvedModel]] = {}
    for reference in models:
        with factory() as session:
            resolved = store.resolve(session, reference, settings.environment)
        loaded[resolved.name] = (load_engine(resolved, device), resolved)
        log.info("model_loaded model=%s version=%s device=%s", reference, resolved.version, device)
    return loaded


def load_engine(resolved: store.ResolvedModel, device: Device) -> Engine:
    from textnlp_jobs.inference.engine import TransformersEngine

    return TransformersEngine(resolved.name, resolved.version, resolved.path, device.torch_device)


def batching_mode(settings: Settings, engines: dict[str, Engine]) -> str:
    """The device's loop: continuous when every model on it asks for continuous (or defaults to
    it on this device) and its engine can decode row by row; static otherwise."""
    modes = {name: settings.batching_for(name).mode_on(engine.device) for name, engine in engines.items()}
    def can_continue(engine: Engine) -> bool:
        return bool(getattr(engine, "supports_continuous", hasattr(engine, "decoder")))

    if modes and all(mode == "continuous" and can_continue(engines[name]) for name, mode in modes.items()):
        return "continuous"
    if "continuous" in modes.values():
        log.warning("batching_mode_static device_models=%s reason=mixed_modes", modes)
    return "static"


class DeviceRuntime:
    """The models and batching loop of one device, and the per-job protocol around them."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], engines: dict[str, Engine],
                 *, worker_name: str, republish: Republish) -> None:
        self.settings = settings
        self.sessions = factory
        self.engines = engines
        self.worker_name = worker_name
        self.republish = republish
        self.mode = batching_mode(settings, engines)
        batcher = ContinuousBatcher if self.mode == "continuous" else MicroBatcher
        self.batcher: MicroBatcher | ContinuousBatcher = batcher(
            engines, settings.batching_for, drop_filter=self._drop_filter, name=worker_name)
        self.claims: GroupRunner[uuid.UUID, repo.ClaimOutcome] = GroupRunner("claim", self._claim_group)
        self.writes: GroupRunner[repo.Finished, bool] = GroupRunner("write", self._write_group)
        # Set by the worker: switches versions on promotion and records loads and use (versions.py).
        self.watcher: ModelWatcher | None = None

    def start(self) -> None:
        """Start the batching loop and warm every model up on it, before any job arrives."""
        self.claims.start()
        self.writes.start()
        self.batcher.start()
        for engine in self.engines.values():
            warm_up = getattr(engine, "warm_up", None)
            if warm_up is not None:
                self.batcher.call_on_loop(warm_up).result(timeout=self.settings.max_job_seconds)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()
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
        if job.model not in self.engines:
            return self._not_served_here(job)
        metrics.QUEUE_WAIT.labels(job.model).observe((utcnow() - job.created_at).total_seconds())
        try:
            request = self._request_for(job)
            future = self.batcher.submit((job.id, job.attempt), job.model, request)
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
        if self.watcher is not None:
            self.watcher.used(job.model)
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

    def _request_for(self, job: repo.ClaimedJob) -> EngineRequest:
        engine = self.engines.get(job.model)
        if engine is None:
            raise InputError("model", f"{job.model!r} is not loaded on {self.worker_name}",
                             code=ErrorCode.INPUT_MODEL_NOT_ON_DEVICE)
        # A chat job's prompt is its messages as JSON (validation.py); the model's template renders them.
        ids = engine.tokenize_chat(json.loads(job.prompt)) if job.params.get("chat") else engine.tokenize(job.prompt)
        if len(ids) > self.settings.max_prompt_tokens:
            raise InputError("prompt", f"is {len(ids)} tokens, over the limit of "
                             f"{self.settings.max_prompt_tokens} tokens", code=ErrorCode.INPUT_PROMPT_TOO_MANY_TOKENS)
        params = job.params
        sampling = SamplingParams(float(params.get("temperature", 0.0)), float(params.get("top_p", 1.0)),
                                  int(params.get("top_k", 0)))
        return EngineRequest(ids, job.max_new_tokens, sampling, params.get("seed"))

    def _drop_filter(self, batch: Sequence[PendingJob]) -> set[object]:
        with self.sessions() as session:
            gone = repo.cancelled_or_overdue(session, [p.job_id for p in batch])
        return {p.job_id for p in batch if p.job_id[0] in gone}

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
