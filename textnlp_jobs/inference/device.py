"""One device's runtime: its loaded models, its batching loop, and the life of one job on it.

``DeviceRuntime.run_job`` is what a Celery task thread calls: claim the row, hand the job to the
batching loop, wait for its own result, write it exactly once. It knows nothing of Celery; the
task module is a thin shell around it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import utcnow
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
from textnlp_jobs.inference.engine import Engine, EngineRequest, SamplingParams
from textnlp_jobs.inference.versions import ModelWatcher
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

Republish = Callable[[Sequence[repo.Routing]], None]


@dataclass(frozen=True)
class DeviceId:
    """A device as operators name it: ``cuda.0``, ``cpu.1``."""

    kind: str
    index: int

    @classmethod
    def parse(cls, text: str) -> DeviceId:
        kind, _, index = text.replace(":", ".").partition(".")
        if kind not in ("cuda", "cpu") or not (index or "0").isdigit():
            raise ValueError(f"device {text!r} is not like 'cuda.0' or 'cpu.0'")
        return cls(kind, int(index or 0))

    def __str__(self) -> str:
        return f"{self.kind}.{self.index}"

    @property
    def torch_device(self) -> str:
        # CUDA_VISIBLE_DEVICES pins the process to its GPU, which it then sees as cuda:0.
        return "cuda:0" if self.kind == "cuda" else "cpu"


def load_engines(settings: Settings, factory: sessionmaker[Session], device: DeviceId,
                 models: Sequence[str]) -> dict[str, Engine]:
    """Load every model placed on ``device`` once (``DeviceRuntime.start`` warms them up). A
    placement reference ``small@int8`` loads that variant under the model's own name (``small``).
    A corrupt version is refused here with a clear error (``ModelCorruptError``)."""
    return {name: engine for name, (engine, _) in load_resolved(settings, factory, device, models).items()}


def load_resolved(settings: Settings, factory: sessionmaker[Session], device: DeviceId,
                  models: Sequence[str]) -> dict[str, tuple[Engine, store.ResolvedModel]]:
    """``load_engines`` with the registry's answer for each model (its version's id)."""
    loaded: dict[str, tuple[Engine, store.ResolvedModel]] = {}
    for reference in models:
        with factory() as session:
            resolved = store.resolve(session, reference, settings.environment)
        loaded[resolved.name] = (load_engine(resolved, device), resolved)
        log.info("model_loaded model=%s version=%s device=%s", reference, resolved.version, device)
    return loaded


def load_engine(resolved: store.ResolvedModel, device: DeviceId) -> Engine:
    from textnlp_jobs.inference.engine import TransformersEngine

    return TransformersEngine(resolved.name, resolved.version, resolved.path, device.torch_device)


class DeviceRuntime:
    """The models and batching loop of one device, and the per-job protocol around them."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], engines: dict[str, Engine],
                 *, worker_name: str, republish: Republish) -> None:
        self.settings = settings
        self.sessions = factory
        self.engines = engines
        self.worker_name = worker_name
        self.republish = republish
        self.batcher = MicroBatcher(engines, settings.batching_for, drop_filter=self._drop_filter,
                                    name=worker_name)
        # Set by the worker: switches versions on promotion and records loads and use (versions.py).
        self.watcher: ModelWatcher | None = None

    def start(self) -> None:
        """Start the batching loop and warm every model up on it, before any job arrives."""
        self.batcher.start()
        for engine in self.engines.values():
            warm_up = getattr(engine, "warm_up", None)
            if warm_up is not None:
                self.batcher.call_on_loop(warm_up).result(timeout=self.settings.max_job_seconds)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()

    def run_job(self, job_id: uuid.UUID) -> str:
        """Run one delivery of a job. Returns what happened (a status, or why nothing ran)."""
        with self.sessions.begin() as session:
            outcome = repo.claim(session, job_id, self.worker_name, self.settings.lease_seconds)
        job = outcome.job
        if job is None:
            log.info("job_not_run job=%s reason=%s", job_id, outcome.reason)
            metrics.JOBS_DROPPED.labels("unknown", outcome.reason).inc()
            return outcome.reason
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
        with self.sessions.begin() as session:
            written = repo.write_success(session, job.id, job.attempt, repo.Outcome(
                text=result.text, tokens_generated=result.tokens_generated, mean_logprob=result.mean_logprob,
                model_version=done.model_version, batch_size=done.batch_size,
                queue_wait_seconds=(utcnow() - job.created_at).total_seconds() - done.inference_seconds,
                inference_seconds=done.inference_seconds,
            ), self.worker_name)
        if not written:  # cancelled meanwhile, or the lease went to another attempt
            log.info("result_discarded job=%s attempt=%d", job.id, job.attempt)
            return "discarded"
        metrics.JOBS_FINISHED.labels(job.model, "succeeded").inc()
        if self.watcher is not None:
            self.watcher.used(job.model)
        return "succeeded"

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
        log.info("job_dropped job=%s reason=%s", job.id, reason)
        return reason

    def _give_back(self, job: repo.ClaimedJob) -> str:
        with self.sessions.begin() as session:
            routing = repo.release(session, job.id, job.attempt)
        if routing is not None:
            self.republish([routing])
        return "released"

    def _failed(self, job: repo.ClaimedJob, error: TextNLPError, *, retry: bool) -> str:
        with self.sessions.begin() as session:
            status = repo.write_failure(session, job.id, job.attempt, error.code, error.message,
                                        self.worker_name, retry=retry)
        metrics.MODEL_ERRORS.labels(job.model, error.code).inc()
        log.warning("job_failed job=%s attempt=%d code=%s status=%s", job.id, job.attempt, error.code, status)
        return status or "discarded"
