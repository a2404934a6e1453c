"""The engine side of a device: its loaded models, its batching loop, and how a job reaches them.

A device worker has two halves. The *system* half (``device.DeviceRuntime``: Celery's task
threads, claims, result writes, acks) is Python from end to end. The *engine* half (the models and
the one batching loop) is Python that launches device work step by step. In one process the two
share the GIL, and every millisecond of ledger or broker work is a millisecond the decode loop
waits: on an H200 the loop fed by Celery task threads in the same process ran at 0.23 of the same
loop alone. So by default the engine half runs in a process of its own (``engine_process``) and
the two exchange jobs and results in batches over a pipe.

Both halves speak ``EngineSide``: ``submit(key, model, JobSpec) -> Future[BatchedResult]``.
``LocalEngineSide`` is the engine half itself (tests with stub engines use it in-process, and the
engine process wraps it); ``engine_process.RemoteEngineSide`` forwards to a child that runs one.
A ``JobSpec`` is the job before tokenization: the prompt is tokenized on the engine side, where
the model's tokenizer lives, so the system half never loads a model.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db import repository as repo
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import ErrorCode, InputError, ModelStoreError, TextNLPError
from textnlp_jobs.inference import store
from textnlp_jobs.inference.batcher import BatchedResult, MicroBatcher, PendingJob
from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import Engine, EngineRequest, SamplingParams
from textnlp_jobs.inference.versions import ModelWatcher
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What a claimed job asks of the engine, before tokenization (small and picklable)."""

    prompt: str
    chat: bool
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...] = ()

    @classmethod
    def of(cls, job: repo.ClaimedJob) -> JobSpec:
        params = job.params
        return cls(job.prompt, bool(params.get("chat")), job.max_new_tokens,
                   SamplingParams(float(params.get("temperature", 0.0)), float(params.get("top_p", 1.0)),
                                  int(params.get("top_k", 0))),
                   params.get("seed"), tuple(params.get("stop") or ()))


def engine_requests(engine: Engine, specs: Sequence[JobSpec],
                    max_prompt_tokens: int) -> list[EngineRequest | Exception]:
    """Tokenize each job of one model with ``engine``'s tokenizer: each job's request, or its own
    error (a prompt over the token limit, a tokenizer error). Plain prompts are tokenized in one
    call where the engine can (``tokenize_many``)."""
    plain = [i for i, spec in enumerate(specs) if not spec.chat]
    many = getattr(engine, "tokenize_many", None)
    ids_of: dict[int, list[int] | TextNLPError] = {}
    if many is not None and len(plain) > 1:
        ids_of.update(zip(plain, many([specs[i].prompt for i in plain]), strict=True))
    out: list[EngineRequest | Exception] = []
    for i, spec in enumerate(specs):
        try:
            ids = ids_of.get(i)
            if ids is None:
                # A chat job's prompt is its messages as JSON (validation.py); the model's template renders them.
                ids = engine.tokenize_chat(json.loads(spec.prompt)) if spec.chat else engine.tokenize(spec.prompt)
            if isinstance(ids, TextNLPError):
                raise ids
            if len(ids) > max_prompt_tokens:
                raise InputError("prompt", f"is {len(ids)} tokens, over the limit of {max_prompt_tokens} tokens",
                                 code=ErrorCode.INPUT_PROMPT_TOO_MANY_TOKENS)
            out.append(EngineRequest(ids, spec.max_new_tokens, spec.sampling, spec.seed, spec.stop))
        except Exception as error:  # this job only
            out.append(error)
    return out


class EngineSide(Protocol):
    """Where a device's jobs are generated; see the module docstring."""

    mode: str  # "continuous" or "static"

    def served(self) -> frozenset[str]:
        """The model names loaded here."""
        ...

    def submit(self, key: Any, model: str, spec: JobSpec) -> Future[BatchedResult]:
        """Generate ``spec`` with ``model``; the future fails with ``JobDroppedError`` (cancelled or
        overdue), ``WorkerShuttingDownError`` (give the job back) or another ``TextNLPError``."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def batching_mode(settings: Settings, engines: dict[str, Engine]) -> str:
    """The device's loop: continuous when every model on it asks for continuous (or defaults to
    it on this device) and its engine can decode row by row; static otherwise."""
    modes = {name: settings.batching_for(name).mode_on(engine.device) for name, engine in engines.items()}
    if not modes or set(modes.values()) != {"continuous"}:
        if "continuous" in modes.values():
            log.warning("batching_mode_static device_models=%s reason=mixed_modes", modes)
        return "static"
    static_only = {name: static_only_reason(engine) for name, engine in engines.items()}
    static_only = {name: reason for name, reason in static_only.items() if reason is not None}
    if static_only:
        # One loop serves the device: a model that cannot decode row by row holds all to static.
        log.warning("batching_mode_static device_models=%s reason=static_only_models %s", modes,
                    " ".join(f"{name}={reason}" for name, reason in sorted(static_only.items())))
        return "static"
    return "continuous"


def static_only_reason(engine: Engine) -> str | None:
    """Why ``engine`` cannot run in a continuous loop (None when it can): its own reason, or that
    it has no row-by-row decoder at all."""
    if not hasattr(engine, "decoder"):
        return "no_decoder"
    return getattr(engine, "static_only_reason", None)


def load_resolved(settings: Settings, factory: sessionmaker[Session], device: Device,
                  models: Sequence[str]) -> dict[str, tuple[Engine, store.ResolvedModel]]:
    """Load every model placed on ``device`` once, with the registry's answer for each (its
    version's id). A placement reference ``small@int8`` loads that variant under the model's own
    name (``small``). A corrupt version is refused here with a clear error (``ModelCorruptError``)."""
    loaded: dict[str, tuple[Engine, store.ResolvedModel]] = {}
    for reference in models:
        with factory() as session:
            resolved = store.resolve(session, reference, settings.environment)
        engine = load_engine(resolved, device, settings.dtype_for(resolved.name))
        loaded[resolved.name] = (engine, resolved)
        log.info("model_loaded model=%s version=%s device=%s dtype=%s", reference, resolved.version, device,
                 getattr(engine, "dtype", "?"))
    return loaded


def load_engine(resolved: store.ResolvedModel, device: Device, dtype: str) -> Engine:
    """The engine of ``resolved`` on ``device``, its float weights in ``dtype`` (``TEXTNLP_DTYPE``).
    A CPU without instructions for the dtype it runs in is named in the log: there the dtype that
    halves the memory can make decoding several times slower."""
    from textnlp_jobs.inference.engine import TransformersEngine
    from textnlp_jobs.inference.loading import emulated_on_this_cpu

    engine = TransformersEngine(resolved.name, resolved.version, resolved.path, device.torch_device, dtype)
    if device.torch_device == "cpu" and emulated_on_this_cpu(engine.dtype):
        log.warning("dtype_emulated model=%s dtype=%s device=%s: this CPU has no %s instructions, so decoding in it "
                    "may be several times slower than in float32 (TEXTNLP_DTYPE; bench/dtype.py measures)",
                    resolved.name, engine.dtype, device, engine.dtype)
    return engine


def prepare_loop_process(torch_threads: int | None) -> None:
    """Settings for the process that runs a batching loop. The loop re-takes the GIL after every
    torch op; when another thread holds it, the loop waits up to the switch interval (5 ms by
    default) each time, so a shorter one keeps the device fed."""
    import sys

    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    sys.setswitchinterval(0.0005)


class LocalEngineSide:
    """The engines and the batching loop of one device, in this process."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], engines: dict[str, Engine],
                 *, name: str) -> None:
        self.settings = settings
        self.sessions = factory
        self.engines = engines
        self.name = name
        self.mode = batching_mode(settings, engines)
        batcher = ContinuousBatcher if self.mode == "continuous" else MicroBatcher
        self.batcher: MicroBatcher | ContinuousBatcher = batcher(
            engines, settings.batching_for, drop_filter=self._drop_filter, name=name)
        # Switches versions on promotion and records loads and use (versions.py); see watch().
        self.watcher: ModelWatcher | None = None

    @classmethod
    def load(cls, settings: Settings, factory: sessionmaker[Session], device: Device,
             references: Sequence[str]) -> LocalEngineSide:
        """Load the models placed on ``device`` and watch the registry for their promotions."""
        loaded = load_resolved(settings, factory, device, references)
        side = cls(settings, factory, {name: engine for name, (engine, _) in loaded.items()}, name=device.name)
        side.watch(device, references, {name: resolved.version_id for name, (_, resolved) in loaded.items()})
        return side

    def watch(self, device: Device, references: Sequence[str], version_ids: dict[str, int | None]) -> None:
        """Follow promotions and rollbacks of the loaded models (started by ``start``)."""
        from textnlp_jobs.inference.registry import parse_reference

        self.watcher = ModelWatcher(
            self.settings, self.sessions, self.engines, {parse_reference(r)[0]: r for r in references},
            worker=device.name, load=lambda resolved: self._load_for_this_loop(resolved, device),
            run_on_loop=lambda call: self.batcher.call_on_loop(call).result(timeout=self.settings.max_job_seconds))
        for name, version_id in version_ids.items():
            self.watcher.loaded(name, version_id)

    def _load_for_this_loop(self, resolved: store.ResolvedModel, device: Device) -> Engine:
        """A promoted version's engine, refused when this device's continuous loop cannot decode
        it (its jobs would all fail there): the loaded version keeps serving, and a restarted
        worker serves the new one in static mode."""
        engine = load_engine(resolved, device, self.settings.dtype_for(resolved.name))
        reason = static_only_reason(engine) if self.mode == "continuous" else None
        if reason is not None:
            raise ModelStoreError(f"{resolved.name} version {resolved.version} cannot join this worker's continuous "
                                  f"batches ({reason}); restart the worker to serve it in static mode")
        return engine

    def served(self) -> frozenset[str]:
        return frozenset(self.engines)

    def start(self) -> None:
        """Start the batching loop and warm every model up on it, before any job arrives."""
        self.batcher.start()
        for engine in self.engines.values():
            warm_up = getattr(engine, "warm_up", None)
            if warm_up is not None:
                self.batcher.call_on_loop(warm_up).result(timeout=self.settings.max_job_seconds)
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()

    def submit(self, key: Any, model: str, spec: JobSpec) -> Future[BatchedResult]:
        return self.submit_many([(key, model, spec)])[0]

    def submit_many(self, jobs: Sequence[tuple[Any, str, JobSpec]]) -> list[Future[BatchedResult]]:
        """``submit`` for a message of jobs (the engine process gets them in lists): each model's
        prompts are tokenized in one call and the jobs reach the loop together. A job refused at
        once (a prompt over the limit, a model not loaded here, the loop stopping) gets a failed
        future; the others are unaffected."""
        by_model: dict[str, list[int]] = {}
        for index, (_, model, _) in enumerate(jobs):
            by_model.setdefault(model, []).append(index)
        made_for: dict[int, EngineRequest | Exception] = {}
        for model, indices in by_model.items():
            engine = self.engines.get(model)
            made: list[EngineRequest | Exception] = (
                engine_requests(engine, [jobs[i][2] for i in indices], self.settings.max_prompt_tokens)
                if engine is not None else
                [InputError("model", f"{model!r} is not loaded on {self.name}",
                            code=ErrorCode.INPUT_MODEL_NOT_ON_DEVICE) for _ in indices])
            made_for.update(zip(indices, made, strict=True))
        requests = [made_for[index] for index in range(len(jobs))]
        accepted = [(jobs[i][0], jobs[i][1], request) for i, request in enumerate(requests)
                    if isinstance(request, EngineRequest)]
        try:
            queued = iter(self.batcher.submit_many(accepted))
        except Exception as stopping:  # WorkerShuttingDownError: none of them was queued
            requests = [stopping if isinstance(request, EngineRequest) else request for request in requests]
            queued = iter(())
        futures: list[Future[BatchedResult]] = []
        for (_, model, _), request in zip(jobs, requests, strict=True):
            if isinstance(request, EngineRequest):
                future = next(queued)
                if self.watcher is not None:
                    future.add_done_callback(functools.partial(self._used, model))
            else:
                future = Future()
                future.set_exception(request)
            futures.append(future)
        return futures

    def _used(self, model: str, done: Future[BatchedResult]) -> None:
        if self.watcher is not None and not done.exception():
            self.watcher.used(model)

    def _drop_filter(self, batch: Sequence[PendingJob]) -> set[object]:
        """The jobs of ``batch`` cancelled or past their deadline in the ledger (keys are
        ``(job id, attempt)``)."""
        with self.sessions() as session:
            gone = repo.cancelled_or_overdue(session, [p.job_id for p in batch])
        return {p.job_id for p in batch if p.job_id[0] in gone}

