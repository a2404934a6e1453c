"""--dry-run changes nothing: for every task, row counts, the archive folder and the Redis keys are
the same before and after, while the report says what a real run would do. On the embedded
default every task either runs or says why it is skipped."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text, update

from tests.test_cache_maintenance import unacked_entry
from textnlp_jobs.client import Client
from textnlp_jobs.constants import KOMBU_UNACKED_INDEX_KEY, KOMBU_UNACKED_KEY
from textnlp_jobs.db.models import Generation, MaintenanceRun
from textnlp_jobs.db.session import get_engine
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack, seed_generations
from textnlp_jobs.maintenance.registry import load_tasks
from textnlp_jobs.maintenance.runner import run_maintenance
from textnlp_jobs.settings import Settings

TABLES = ("prompts", "generations", "audit_logs", "models", "model_versions")


def ledger_state(settings: Settings) -> dict[str, Any]:
    with get_engine(settings).connect() as connection:
        state: dict[str, Any] = {t: connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
        state["statuses"] = sorted(connection.execute(select(Generation.status, Generation.archived, func.count())
                                                      .group_by(Generation.status, Generation.archived)).all())
        state["real_runs"] = connection.execute(select(func.count()).where(MaintenanceRun.dry_run.is_(False))
                                                ).scalar_one()
    return state


# Celery's remote-control replies (the dead-letter and binding checks ask workers which queues they
# consume): kombu keeps the reply binding with an expiry of its own. Transport bookkeeping, not data.
CONTROL_REPLY_KEYS = (b"_kombu.binding_deadlines", b"_kombu.binding.reply.celery.pidbox")


def redis_state(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type, and the content of everything that is not a plain cache string
    (read without touching the strings' idle time: TYPE does not count as an access)."""
    state: dict[bytes, Any] = {}
    for key in client.scan_iter(count=1000):
        if key.startswith(CONTROL_REPLY_KEYS) or b"reply.celery.pidbox" in key:
            continue
        kind = client.type(key)
        if kind == b"list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"set":
            state[key] = client.smembers(key)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = kind
    return state


def folder_state(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.integration
def test_a_dry_run_of_every_task_changes_nothing_on_postgresql_and_redis(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings(archive_dir=str(tmp_path / "archive"), cache_idle_seconds=1,
                              dead_letter_after_seconds=1)
    seed_generations(settings, 2_000)
    client = Client(settings)
    orphan = client.submit("Read the file and", model="tiny")  # no worker: its queue has no consumer
    finished = client.submit("Return a new list", model="demo")
    client.cancel(finished.id)
    with client.sessions.begin() as session:
        session.execute(update(Generation).where(Generation.id == orphan.id)
                        .values(published_at=datetime.now(UTC) - timedelta(days=2)))
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    broker.set("textnlp:cache:idle", "v")
    broker.hset(KOMBU_UNACKED_KEY, "t1", unacked_entry(str(finished.id), "t1"))
    broker.zadd(KOMBU_UNACKED_INDEX_KEY, {"t1": time.time() - 7200})
    time.sleep(2.5)

    before = (ledger_state(settings), folder_state(tmp_path / "archive"), redis_state(broker))
    reports = {name: run_maintenance(name, settings=settings, dry_run=True) for name in load_tasks()}
    after = (ledger_state(settings), folder_state(tmp_path / "archive"), redis_state(broker))
    assert after == before
    assert all(r["status"] == "succeeded" and r["dry_run"] for r in reports.values()), reports
    assert reports["db.retention"]["would_archive"] > 900
    assert reports["cache.expire"]["candidates"] >= 1 and reports["cache.expire"]["stale_unacked"] == 1
    assert reports["queues.dead_letter"]["dead_lettered"] == 1
    assert reports["db.vacuum"]["would_vacuum"] and reports["db.reindex"]["would_reindex"]
    broker.close()


@pytest.mark.slow
def test_on_the_embedded_default_every_task_runs_or_says_why_it_is_skipped(embedded_stack: LocalStack) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT, timeout=180,
                              env=embedded_stack.process_env({"COLUMNS": "250"}), capture_output=True, text=True)

    settings = embedded_stack.settings()
    before = ledger_state(settings)
    for name in load_tasks():
        done = cli("maintenance", "run", name, "--dry-run")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "'status': 'succeeded'" in done.stdout or "'status': 'skipped'" in done.stdout, done.stdout
        if "'status': 'skipped'" in done.stdout:
            assert "'reason':" in done.stdout
    assert ledger_state(settings) == before
    for name in load_tasks():
        done = cli("maintenance", "run", name)
        assert done.returncode == 0 and ("succeeded" in done.stdout or "skipped" in done.stdout), done.stdout
    listing = cli("maintenance", "list")
    assert listing.returncode == 0
    for name in load_tasks():
        assert name in listing.stdout
