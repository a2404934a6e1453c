"""Version switching in a running device worker, without a restart.

A ``ModelWatcher`` thread asks the registry every ``TEXTNLP_MODEL_POLL_SECONDS`` which version each
placed model should serve in this worker's environment. When a promotion or rollback changed it,
the watcher loads the new version beside the old one (on its own thread, so the device keeps
serving), warms it up on the batching loop between batches, then swaps it into the engine map:
batches that start afterwards use the new version, a batch already running finishes on the old
one, and the old one is freed when its last batch lets go of it. The version that produced each
result is written on the job row. Once a ``TEXTNLP_MODEL_HEARTBEAT_SECONDS`` the watcher records
which versions this worker has loaded (cleanup and remove leave those alone) and which it used
(``last_used_at``): one statement per minute per worker, not one per job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.errors import TextNLPError
from textnlp_jobs.inference import registry
from textnlp_jobs.inference.store import ResolvedModel
from textnlp_jobs.settings import Settings

log = logging.getLogger(__name__)

EngineLoader = Callable[[ResolvedModel], Any]


class ModelWatcher:
    """Keeps ``engines`` (model name -> loaded engine, shared with the batching loop) on the
    versions the registry says to serve."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], engines: dict[str, Any],
                 references: Mapping[str, str], *, worker: str, load: EngineLoader,
                 run_on_loop: Callable[[Callable[[], Any]], Any]) -> None:
        self.settings = settings
        self.sessions = factory
        self.engines = engines
        self.references = dict(references)  # model name -> placement reference ("small@int8")
        self.worker = worker
        self.load = load
        self.run_on_loop = run_on_loop
        self.version_ids: dict[str, int] = {}  # model name -> registry id of the version loaded
        self._used: set[int] = set()
        self._used_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0
        self._failed: dict[str, str] = {}  # model name -> version that would not load (not retried)

    def loaded(self, name: str, version_id: int | None) -> None:
        """Note what the worker loaded at start (before the watcher runs)."""
        if version_id is not None:
            self.version_ids[name] = version_id

    def used(self, name: str) -> None:
        """A job of ``name`` succeeded on the version now loaded (cheap: a set add)."""
        version_id = self.version_ids.get(name)
        if version_id is not None:
            with self._used_lock:
                self._used.add(version_id)

    def start(self) -> None:
        self.heartbeat()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        try:
            self.heartbeat()
            with self.sessions.begin() as session:
                registry.forget_loads(session, self.worker)
        except Exception:  # the ledger may be gone at shutdown; the loads expire on their own
            log.warning("model_loads_not_cleared worker=%s", self.worker)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.model_poll_seconds):
            try:
                self.check()
                if time.monotonic() - self._last_heartbeat >= self.settings.model_heartbeat_seconds:
                    self.heartbeat()
            except Exception:  # a ledger hiccup must not end the watcher; the next poll retries
                log.exception("model_watch_failed worker=%s", self.worker)

    def check(self) -> list[str]:
        """Switch every model whose serving version changed; returns the names switched."""
        switched = []
        for name, reference in self.references.items():
            try:
                with self.sessions() as session:
                    wanted = registry.resolve(session, reference, self.settings.environment)
            except TextNLPError as error:  # e.g. the new version is corrupt: keep serving the one loaded
                log.error("model_switch_refused model=%s reason=%s", reference, error.message)
                continue
            current = self.engines.get(name)
            if current is not None and current.model_version == wanted.version:
                continue
            if self._failed.get(name) == wanted.version:  # tried and failed; wait for another promotion
                continue
            try:
                self.switch(name, wanted)
            except TextNLPError as error:  # refused with a reason (it cannot run in this loop, say)
                self._failed[name] = wanted.version
                log.error("model_switch_refused model=%s version=%s reason=%s", name, wanted.version, error.message)
                continue
            except Exception:  # a version that does not load here: keep serving the one loaded
                self._failed[name] = wanted.version
                log.exception("model_switch_failed model=%s version=%s", name, wanted.version)
                continue
            switched.append(name)
        return switched

    def switch(self, name: str, wanted: ResolvedModel) -> None:
        old = self.engines.get(name)
        old_version = getattr(old, "model_version", None)
        started = time.monotonic()
        engine = self.load(wanted)  # beside the old one; the device keeps serving meanwhile
        warm_up = getattr(engine, "warm_up", None)
        if warm_up is not None:
            self.run_on_loop(warm_up)
        if wanted.version_id is not None:
            with self.sessions.begin() as session:  # both count as loaded until the old one goes
                registry.record_loads(session, self.worker, [*self.version_ids.values(), wanted.version_id])
        self.engines[name] = engine  # new batches use it; a running batch keeps its reference to the old
        if wanted.version_id is not None:
            self.version_ids[name] = wanted.version_id
        del old
        log.info("model_switched model=%s from=%s to=%s seconds=%.2f", name, old_version, wanted.version,
                 time.monotonic() - started)
        self.heartbeat()

    def heartbeat(self) -> None:
        """Record what is loaded and what was used since the last heartbeat."""
        self._last_heartbeat = time.monotonic()
        with self._used_lock:
            used, self._used = self._used, set()
        with self.sessions.begin() as session:
            registry.record_loads(session, self.worker, self.version_ids.values())
            registry.touch_last_used(session, used)
