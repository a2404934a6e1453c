"""A scratch copy of the whole system on this machine, for tests and benchmarks.

It creates its own PostgreSQL database and claims its own Redis database number on the servers
already running (never touching anyone else's data), migrates, starts real worker processes, and
removes everything it made when closed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textnlp_jobs import launcher
from textnlp_jobs.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
_OWNER_KEY = "textnlp:local-stack:owner"


class ServiceUnavailable(RuntimeError):
    """PostgreSQL or Redis is not reachable."""


@contextmanager
def scratch_postgres(server: str = "postgresql+psycopg://postgres@127.0.0.1:5432") -> Iterator[str]:
    """A new, empty database on ``server``; dropped afterwards. Yields its URL."""
    import psycopg

    name = f"textnlp_scratch_{uuid.uuid4().hex[:12]}"
    admin = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        raise ServiceUnavailable(f"PostgreSQL at {server}: {error}") from error
    try:
        yield f"{server}/{name}"
    finally:
        from textnlp_jobs.db.session import dispose_engines

        dispose_engines()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_redis(host: str = "127.0.0.1", port: int = 6379) -> Iterator[str]:
    """Claim a Redis database number no one else uses (1..15) for the duration; emptied
    (FLUSHDB of that number only) afterwards. Yields its URL."""
    import redis

    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    chosen = None
    try:
        for db in range(1, 16):
            client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=3)
            if client.dbsize() == 0 and client.set(_OWNER_KEY, token, nx=True, ex=6 * 3600):
                chosen = client
                break
            client.close()
    except redis.ConnectionError as error:
        raise ServiceUnavailable(f"Redis at {host}:{port}: {error}") from error
    if chosen is None:
        raise ServiceUnavailable("no free Redis database number in 1..15")
    db_number = chosen.connection_pool.connection_kwargs["db"]
    try:
        yield f"redis://{host}:{port}/{db_number}"
    finally:
        chosen.flushdb()
        chosen.close()


def keep_ownership(redis_url: str) -> None:
    """Mark a claimed Redis database as ours again (after a test flushed it on purpose)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set(_OWNER_KEY, "reclaimed", ex=6 * 3600)
    client.close()


@dataclass
class WorkerProcess:
    """A real worker subprocess that can be killed and started again."""

    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> WorkerProcess:
        self.starts += 1
        self.process = launcher.start_process(self.command, env=self.env, log_path=self.log_path, new_session=True,
                                              cwd=REPO_ROOT)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no acks, no releases."""
        if self.process:
            launcher.kill_process(self.process)

    def stop(self, grace: float = 20.0) -> None:
        if self.process:
            launcher.stop_processes([self.process], grace)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalStack:
    """Settings (as environment variables) shared by this process and the workers it starts."""

    env: dict[str, str]
    workdir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            key[len("TEXTNLP_"):].lower(): json.loads(value) if value[:1] in "{[" else value
            for key, value in self.env.items() if key.startswith("TEXTNLP_")
        }
        values.update(overrides)
        return Settings(**values)

    def process_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTNLP_")}
        env.update(self.env)
        env.update(extra or {})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def device_worker(self, device: str = "cpu.0", *, extra_env: Mapping[str, str] | None = None,
                      args: list[str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(
            launcher.device_worker_command(device, extra=args or ()),
            self.process_env(extra_env), self.workdir / f"worker-{device}-{len(self.workers)}.log",
        )
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker_hostname: str, timeout: float = 120.0) -> None:
        """Until the worker answers a ping (its models are loaded before it consumes)."""
        if launcher.wait_for_worker(self.settings(), worker_hostname, timeout,
                                    alive=lambda: any(w.alive for w in self.workers)):
            return
        tails = "\n---\n".join(w.log_tail() for w in self.workers)
        raise TimeoutError(f"worker {worker_hostname} not ready after {timeout:.0f}s\n{tails}")

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


_SEED_SQL = """
INSERT INTO prompts (id, text, sha256, byte_length, token_count, created_at)
SELECT md5('p' || i || :salt)::uuid, 'seeded prompt ' || i, md5(i::text) || md5(i::text), 16, 4,
       now() - ((i % 180) + 0.5) * interval '1 day'
FROM generate_series(1, :n) AS i;
INSERT INTO generations (id, prompt_id, model, params, max_new_tokens, status, priority, attempts, max_attempts,
                         result_text, tokens_generated, archived, created_at, updated_at, finished_at)
SELECT md5('g' || i || :salt)::uuid, md5('p' || i || :salt)::uuid, 'demo', '{"temperature": 0}'::jsonb, 8,
       CASE WHEN i % 97 = 0 THEN 'queued' WHEN i % 89 = 0 THEN 'running' WHEN i % 7 = 0 THEN 'failed'
            ELSE 'succeeded' END,
       0, 1, 3, 'seeded result ' || i, 8, false,
       now() - ((i % 180) + 0.5) * interval '1 day', now(), now() - ((i % 180) + 0.5) * interval '1 day'
FROM generate_series(1, :n) AS i
"""


def seed_generations(settings: Settings, rows: int) -> None:
    """Seed a PostgreSQL ledger fast (``generate_series``) with ``rows`` generations spread evenly
    over 180 days (so half are past a 90-day policy), one prompt each; about 1% stay ``queued`` and
    1% ``running`` at every age. For retention tests and benchmarks."""
    from sqlalchemy import text

    from textnlp_jobs.db.session import get_engine

    salt = uuid.uuid4().hex
    with get_engine(settings).begin() as connection:
        for statement in _SEED_SQL.split(";"):
            connection.execute(text(statement), {"n": rows, "salt": salt})
    with get_engine(settings).connect() as connection:
        connection.execute(text("ANALYZE generations"))
        connection.execute(text("ANALYZE prompts"))
        connection.commit()


_PRODUCER = """
import json, sys, time
from pathlib import Path
from textnlp_jobs.client import Client

stop, out, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
client = Client()
client.submit("warm up", model=model, max_new_tokens=4)
Path(str(out) + ".ready").touch()
latencies = []
while not stop.exists():
    started = time.perf_counter()
    client.submit("Return a new list", model=model, max_new_tokens=4)
    latencies.append(time.perf_counter() - started)
    time.sleep(0.02)
out.write_text(json.dumps(latencies))
"""


class ProducerProcess:
    """A producer in its own process submitting one job at a time until stopped, timing each
    submit: how long a producer is held up while something else (a large cleanup) runs."""

    def __init__(self, env: Mapping[str, str], workdir: Path, model: str = "demo") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self._stop, self._out = workdir / "producer.stop", workdir / "producer.json"
        self._stop.unlink(missing_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", _PRODUCER, str(self._stop), str(self._out), model],
                                        env=dict(env), cwd=REPO_ROOT)
        give_up = time.monotonic() + 120
        while not Path(str(self._out) + ".ready").exists():
            if self.process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError("the producer process did not start")
            time.sleep(0.1)

    def stop(self) -> list[float]:
        """Stop it; the duration of every submit it made, in seconds."""
        self._stop.touch()
        if self.process.wait(60) != 0:
            raise RuntimeError(f"the producer process failed ({self.process.returncode})")
        latencies: list[float] = json.loads(self._out.read_text())
        return latencies
