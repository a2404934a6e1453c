"""The producer API: submit generation jobs and read their results from the ledger.

    from textnlp_jobs import client
    job = client.submit("Once upon a time", model="demo", max_new_tokens=32)
    job = client.wait(job.id, timeout=60)
    print(job.status, job.text)

Every job is a row before it is a message: ``submit`` validates, inserts, commits, then publishes.
If publishing fails the row stays ``queued`` and the reconciler publishes it later.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, overload

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.celery_app import create_app
from textnlp_jobs.db import device_workers
from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.health import ledger_errors
from textnlp_jobs.db.repository import Job
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.errors import (
    ErrorCode,
    InputError,
    JobNotFoundError,
    JobWaitTimeout,
    TextNLPError,
    UnknownDeviceError,
)
from textnlp_jobs.inference import store
from textnlp_jobs.metrics import registry as metrics
from textnlp_jobs.publish import publish
from textnlp_jobs.settings import Settings, get_settings
from textnlp_jobs.validation import validate_job

__all__ = ["Client", "Job", "JobWaitTimeout", "cancel", "get", "list_jobs", "submit", "submit_many", "wait"]

log = logging.getLogger(__name__)

INSERT_BATCH = 1000
_MODEL_CACHE_SECONDS = 30.0


def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    try:
        return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise InputError("id", f"{job_id!r} is not a job id", code=ErrorCode.INPUT_JOB_ID_INVALID) from None


class Client:
    """A producer bound to one ledger and one broker (from ``settings``)."""

    def __init__(self, settings: Settings | None = None, *, celery: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.celery = celery or create_app(self.settings)
        self.sessions: sessionmaker[Session] = session_factory(self.settings)
        self._lock = threading.Lock()
        self._models: tuple[float, dict[str, store.ResolvedModel | None]] = (0.0, {})
        self._tokenizers: dict[str, Any] = {}
        self._positions: dict[str, int | None] = {}

    # --- submitting ----------------------------------------------------------------------
    def submit(self, prompt: str | bytes | None = None, *, model: str, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               idempotency_key: str | None = None, priority: int = 0, deadline: datetime | None = None,
               device: str | None = None, max_attempts: int | None = None,
               messages: builtins.list[dict[str, str]] | None = None,
               stop: str | builtins.list[str] | None = None) -> Job:
        """Queue one generation job; an idempotency key already used returns that job instead.
        ``messages=[{"role": "user", "content": "…"}, …]`` instead of ``prompt`` applies the model's
        chat template. ``stop``: up to 4 strings; the text ends before the first one the model writes."""
        spec: dict[str, Any] = {
            "prompt": prompt, "model": model, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "seed": seed, "idempotency_key": idempotency_key, "priority": priority, "deadline": deadline,
            "device": device,
        }
        if messages is not None:
            spec["messages"] = messages
        if max_new_tokens is not None:
            spec["max_new_tokens"] = max_new_tokens
        if max_attempts is not None:
            spec["max_attempts"] = max_attempts
        if stop is not None:
            spec["stop"] = stop
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[dict[str, Any]], progress: Callable[[int], None] | None = None,
                    on_unpublished: Callable[[int, Exception], None] | None = None) -> builtins.list[Job]:
        """Queue many jobs, all or nothing: every job is validated first and all rows are
        inserted in one transaction, so one bad job rejects the call and writes nothing.
        The messages are published after the commit. If the broker cannot be reached the jobs
        still exist (the ledger is the truth): they are returned, a warning is logged,
        ``on_unpublished(count, error)`` is called, and the reconciler publishes them later."""
        specs = builtins.list(specs)
        with ledger_errors(self.settings):
            validated = self._validate(specs)
            with self.sessions() as session:
                records = repo.insert_jobs_once(session, validated)
        fresh_ids = {job.id for job in validated}
        to_publish: dict[uuid.UUID, repo.Routing] = {}
        for record in records:  # the same idempotency key twice in one call: one message
            if record.id in fresh_ids:
                to_publish.setdefault(record.id, repo.Routing(record.id, record.model, record.device,
                                                              record.priority))
        routings = builtins.list(to_publish.values())
        for start in range(0, len(routings), INSERT_BATCH):
            chunk = routings[start:start + INSERT_BATCH]
            try:
                # Not stamped: the reconciler reads a row's last send as published_at, else
                # created_at, and these were created a moment ago. A second write of every row
                # (its index included) cost as much as the insert.
                publish(self.celery, self.settings, chunk)
            except Exception as error:  # any broker failure: the rows are safe
                unsent = len(routings) - start
                # A caller that handles it (the CLI prints one line) gets the callback; anyone
                # else gets the warning.
                log.log(logging.INFO if on_unpublished else logging.WARNING,
                        "broker_unreachable unpublished=%d error=%s: the jobs exist and the reconciler will "
                        "send them", unsent, type(error).__name__)
                if on_unpublished is not None:
                    on_unpublished(unsent, error)
                break
            finally:
                if progress:
                    progress(len(chunk))
        for routing in routings:
            metrics.JOBS_SUBMITTED.labels(routing.model).inc()
        return records

    def _validate(self, specs: builtins.list[dict[str, Any]]) -> builtins.list[repo.NewJob]:
        validated = []
        devices: dict[str, builtins.list[str]] | None = None
        count_tokens = self._counted_together(specs) if len(specs) > 1 else self._count_tokens
        for index, spec in enumerate(specs):
            try:
                job = validate_job(spec, self.settings, self._known_models(), count_tokens,
                                   self._max_positions, self._has_chat_template)
                if job.device is not None:
                    if devices is None:
                        devices = self._known_devices()
                    self._check_device(job, devices)
                validated.append(job)
            except InputError as error:
                if len(specs) > 1:
                    error.args = (f"job {index}: {error.args[0]}",)
                raise
        return validated

    def _known_devices(self) -> dict[str, builtins.list[str]]:
        with self.sessions() as session:
            known = device_workers.known_devices(session, self.settings.heartbeat_ttl_seconds)
        return {device.name: device.models for device in known}

    def serving(self, model: str, device: str | None = None) -> builtins.list[str]:
        """The devices whose worker is alive now and serves ``model`` (only ``device``, if given).
        Empty: a job of it waits queued until such a worker starts (it is not lost)."""
        with ledger_errors(self.settings), self.sessions() as session:
            known = device_workers.known_devices(session, self.settings.heartbeat_ttl_seconds)
        return [d.name for d in known if d.alive and model in d.models and device in (None, d.name)]

    @staticmethod
    def _check_device(job: repo.NewJob, devices: dict[str, builtins.list[str]]) -> None:
        """A pinned job must name a device a worker has served, and a model that device serves."""
        device = job.device or ""
        if device not in devices:
            raise UnknownDeviceError(device, builtins.list(devices))
        if job.model not in devices[device]:
            raise InputError("device", f"{device} does not serve model {job.model!r} (it serves: "
                             f"{', '.join(devices[device]) or 'nothing'})", code=ErrorCode.INPUT_MODEL_NOT_ON_DEVICE)

    # --- reading -------------------------------------------------------------------------
    def get(self, job_id: uuid.UUID | str) -> Job:
        with ledger_errors(self.settings), self.sessions() as session:
            job = repo.get_job(session, _as_uuid(job_id))
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return job

    def get_many(self, ids: Sequence[uuid.UUID | str]) -> builtins.list[Job]:
        wanted = [_as_uuid(i) for i in ids]
        with ledger_errors(self.settings), self.sessions() as session:
            found = {job.id: job for job in repo.get_jobs(session, wanted)}
        missing = [str(i) for i in wanted if i not in found]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise JobNotFoundError(f"no job with id {missing[0]}{more}")
        return [found[i] for i in wanted]

    @overload
    def wait(self, ids: uuid.UUID | str, timeout: float = ..., *, poll: float = ...,  # type: ignore[overload-overlap]
             progress: Callable[[int], None] | None = ...) -> Job: ...
    @overload
    def wait(self, ids: Sequence[uuid.UUID | str], timeout: float = ..., *, poll: float = ...,
             progress: Callable[[int], None] | None = ...) -> builtins.list[Job]: ...

    def wait(self, ids: Any, timeout: float = 60.0, *, poll: float = 0.05,
             progress: Callable[[int], None] | None = None) -> Job | builtins.list[Job]:
        """Block until the job (or every job) is final; raise ``JobWaitTimeout`` past ``timeout``.
        ``progress`` is called with the number of jobs that finished since its last call."""
        single = isinstance(ids, uuid.UUID | str)
        wanted = [_as_uuid(i) for i in ([ids] if single else ids)]
        finished: dict[uuid.UUID, Job] = {}
        give_up = time.monotonic() + timeout
        delay = poll
        self.get_many(wanted)  # every id must exist (JobNotFoundError otherwise)
        while True:
            # Poll the ids that turned final (cheap), then read only those rows: a client waiting
            # for a thousand jobs must not read a thousand rows every poll.
            pending = [i for i in wanted if i not in finished]
            with ledger_errors(self.settings), self.sessions() as session:
                final = repo.final_among(session, pending)
            newly = [job for job in self.get_many([i for i in pending if i in final]) if job.done]
            for job in newly:
                finished[job.id] = job
            if progress and newly:
                progress(len(newly))
            if len(finished) == len(wanted):
                break
            if time.monotonic() >= give_up:
                raise JobWaitTimeout(f"{len(wanted) - len(finished)} of {len(wanted)} jobs not finished "
                                     f"after {timeout:.0f}s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        results = [finished[i] for i in wanted]
        return results[0] if single else results

    def cancel(self, job_id: uuid.UUID | str) -> Job:
        """Cancel a job that has not finished; a finished job is returned unchanged."""
        with ledger_errors(self.settings), self.sessions.begin() as session:
            status = repo.cancel(session, _as_uuid(job_id))
        if status is None:
            raise JobNotFoundError(f"no job with id {job_id}")
        return self.get(job_id)

    def list(  # mirrors the CLI's `jobs list`
        self, *, status: str | None = None, model: str | None = None, limit: int = 50
    ) -> builtins.list[Job]:
        with ledger_errors(self.settings), self.sessions() as session:
            return repo.list_jobs(session, status=status, model=model, limit=limit)

    # --- model knowledge for validation ---------------------------------------------------
    def _resolved_models(self) -> dict[str, store.ResolvedModel | None]:
        """Every registered model and the version served in this environment (None where none
        can be: a corrupt version is still a known model, its jobs wait for a good one)."""
        with self._lock:
            loaded_at, models = self._models
            if time.monotonic() - loaded_at < _MODEL_CACHE_SECONDS and models:
                return models
            models = {}
            with self.sessions() as session:
                for name in store.known_models(session):
                    try:
                        models[name] = store.resolve(session, name, self.settings.environment)
                    except TextNLPError:
                        models[name] = None
            self._models = (time.monotonic(), models)
            return models

    def _has_chat_template(self, model: str) -> bool | None:
        resolved = self._resolved_models().get(model)
        return None if resolved is None else resolved.chat_template

    def _known_models(self) -> builtins.list[str]:
        return builtins.list(self._resolved_models())

    def _max_positions(self, model: str) -> int | None:
        """The longest sequence ``model`` can attend to, from its config in the model store
        (None when this producer cannot read the store: the worker enforces it then)."""
        resolved = self._resolved_models().get(model)
        if resolved is None:
            return None
        key = f"{model}@{resolved.version}"
        with self._lock:
            if key not in self._positions:
                self._positions[key] = store.max_positions(Path(resolved.path))
            return self._positions[key]

    def _tokenizer(self, model: str) -> Any:
        """The model's own tokenizer (the ``tokenizers`` library, no transformers) when this producer
        can read the model store; otherwise None and the worker enforces the token limit."""
        resolved = self._resolved_models().get(model)
        if resolved is None:
            return None
        key = f"{model}@{resolved.version}"
        with self._lock:
            tokenizer = self._tokenizers.get(key)
            if tokenizer is None:
                path = Path(resolved.path) / "tokenizer.json"
                if not path.is_file():
                    return None
                from tokenizers import Tokenizer

                tokenizer = self._tokenizers[key] = Tokenizer.from_file(str(path))
        return tokenizer

    def _count_tokens(self, model: str, prompt: str) -> int | None:
        """Tokens in ``prompt`` by the model's own tokenizer, or None (see ``_tokenizer``): with the
        special tokens its tokenizer.json adds (a BOS), as the worker counts them."""
        tokenizer = self._tokenizer(model)
        return None if tokenizer is None else len(tokenizer.encode(prompt, add_special_tokens=True).ids)

    def _counted_together(self, specs: builtins.list[Any]) -> Callable[[str, str], int | None]:
        """``_count_tokens`` for a submit_many: the plain prompts of each model are counted in one
        ``encode_batch`` (Rust, in parallel, without the GIL), about half the time of one encode
        per prompt, and every job of the call waits for validation before the first is queued.
        Anything not counted here (chat jobs, prompts validation will refuse anyway, a batch the
        tokenizer rejects) is counted one by one as before."""
        by_model: dict[str, set[str]] = {}
        for spec in specs:
            if not isinstance(spec, dict) or spec.get("messages") is not None:
                continue
            prompt, model = spec.get("prompt"), spec.get("model")
            # Longer than the byte limit in characters: refused before counting, so never counted.
            if isinstance(prompt, str) and isinstance(model, str) and len(prompt) <= self.settings.max_prompt_bytes:
                by_model.setdefault(model, set()).add(prompt)
        counted: dict[tuple[str, str], int] = {}
        for model, unique in by_model.items():
            tokenizer = self._tokenizer(model) if len(unique) > 1 else None
            if tokenizer is None:
                continue
            prompts = builtins.list(unique)
            try:
                encoded = tokenizer.encode_batch(prompts, add_special_tokens=True)
            except Exception:  # e.g. a lone surrogate: validation names it, one job at a time
                continue
            counted.update(((model, prompt), len(e.ids)) for prompt, e in zip(prompts, encoded, strict=True))

        def count(model: str, prompt: str) -> int | None:
            found = counted.get((model, prompt))
            return found if found is not None else self._count_tokens(model, prompt)

        return count


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process's client for the configured settings."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def submit(prompt: str | bytes, **kwargs: Any) -> Job:
    return default_client().submit(prompt, **kwargs)


def submit_many(specs: Iterable[dict[str, Any]]) -> list[Job]:
    return default_client().submit_many(specs)


def get(job_id: uuid.UUID | str) -> Job:
    return default_client().get(job_id)


def wait(ids: Any, timeout: float = 60.0) -> Any:
    return default_client().wait(ids, timeout)


def cancel(job_id: uuid.UUID | str) -> Job:
    return default_client().cancel(job_id)


def list_jobs(**kwargs: Any) -> list[Job]:
    return default_client().list(**kwargs)
