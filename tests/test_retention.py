"""db.retention at scale on the real PostgreSQL: archive, verify, delete in bounded batches while a
producer keeps submitting; and on the embedded SQLite ledger through the CLI, with restore."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import Generation, MaintenanceRun, Prompt
from textnlp_jobs.db.session import get_engine
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack, ProducerProcess, seed_generations
from textnlp_jobs.maintenance import archive
from textnlp_jobs.maintenance.runner import run_maintenance
from textnlp_jobs.settings import Settings


def expired_ids(settings: Settings) -> set[str]:
    cutoff = datetime.now(UTC) - timedelta(days=90)
    with get_engine(settings).connect() as connection:
        return {str(i) for i in connection.execute(
            select(Generation.id).where(Generation.created_at < cutoff,
                                        Generation.status.notin_(["queued", "running"]))).scalars()}


def counts(settings: Settings) -> dict[str, int]:
    with get_engine(settings).connect() as connection:
        return {
            "generations": connection.execute(select(func.count()).select_from(Generation)).scalar_one(),
            "prompts": connection.execute(select(func.count()).select_from(Prompt)).scalar_one(),
            "old_live": connection.execute(select(func.count()).where(
                Generation.status.in_(["queued", "running"]),
                Generation.created_at < datetime.now(UTC) - timedelta(days=90))).scalar_one(),
        }


def run_retention_at_scale(stack: LocalStack, tmp_path: Path, rows: int) -> dict[str, Any]:
    settings = stack.settings(archive_dir=str(tmp_path / "archive"))
    seed_generations(settings, rows)
    before, expected = counts(settings), expired_ids(settings)
    client = Client(settings)
    producer = ProducerProcess(stack.process_env({"TEXTNLP_ARCHIVE_DIR": str(tmp_path / "archive")}),
                               tmp_path / "producer")
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(run_maintenance("db.retention", settings=settings,
                                                                            celery=client.celery)))
    started = time.monotonic()
    runner.start()
    # A second run while the first holds the lock reports "locked" at once.
    while runner.is_alive():
        with client.sessions() as session:
            if session.execute(select(MaintenanceRun.id).where(MaintenanceRun.status == "running")).first():
                break
        time.sleep(0.05)
    second_started = time.monotonic()
    second = run_maintenance("db.retention", settings=settings, celery=client.celery)
    second_seconds = time.monotonic() - second_started
    runner.join()
    seconds = time.monotonic() - started
    latencies = producer.stop()
    return {"settings": settings, "before": before, "expected": expected, "result": outcome,
            "second": second, "second_seconds": second_seconds, "seconds": seconds,
            "longest_submit": max(latencies), "submits": len(latencies),
            "after": counts(settings)}


@pytest.mark.integration
def test_retention_archives_then_deletes_every_expired_row_and_nothing_else(stack: LocalStack, tmp_path: Path) -> None:
    run = run_retention_at_scale(stack, tmp_path, rows=100_000)
    result, expected, before, after = run["result"], run["expected"], run["before"], run["after"]
    print(f"\nretention of {len(expected)} of 100000 rows: {run['seconds']:.1f}s, longest submit "
          f"{run['longest_submit'] * 1000:.0f} ms over {run['submits']} submits, "
          f"second run answered {run['second']['status']} in {run['second_seconds'] * 1000:.0f} ms")
    assert result["status"] == "succeeded", result
    assert run["second"] == {"status": "locked"} and run["second_seconds"] < 1.0
    assert run["longest_submit"] < 1.0
    # Every expired row is gone, every other row kept, no queued/running row touched.
    assert len(expected) > 45_000
    assert result["deleted"]["generations"] == len(expected) == result["archived"]
    assert after["generations"] == before["generations"] - len(expected) + run["submits"] + 1
    assert after["old_live"] == before["old_live"] > 0
    assert expired_ids(run["settings"]) == set()
    # The archive holds every deleted generation, checked by reading it back.
    archived: set[str] = set()
    for entry in result["archives"]:
        path = Path(entry["path"])
        manifest = archive.verify(path)
        assert manifest.sha256 == entry["sha256"] and manifest.rows == entry["rows"]
        rows = list(archive.read_rows(path))
        assert {r["created_at"][:10] for r in rows} == {entry["day"]}  # one file per day
        archived.update(r["id"] for r in rows)
    assert archived == expected
    assert 0 < result["largest_batch"] <= run["settings"].retention_batch


@pytest.mark.integration
def test_an_archive_loads_back_into_the_ledger(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings(archive_dir=str(tmp_path / "archive"))
    seed_generations(settings, 1_000)
    expected = expired_ids(settings)
    result = run_maintenance("db.retention", settings=settings)
    first = Path(result["archives"][0]["path"])
    restored = archive.restore(Client(settings).sessions, first)
    assert restored["restored"] == result["archives"][0]["rows"] > 0
    client = Client(settings)
    job = client.get(next(r["id"] for r in archive.read_rows(first)))
    assert job.status in ("succeeded", "failed") and str(job.id) in expected
    assert archive.restore(Client(settings).sessions, first)["already_present"] == restored["restored"]
    # A tampered archive is refused before anything is loaded.
    first.write_bytes(first.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(archive.ArchiveError):
        archive.restore(Client(settings).sessions, first)


@pytest.mark.slow
def test_embedded_retention_through_the_cli_archives_deletes_and_restores(embedded_stack: LocalStack) -> None:
    settings = embedded_stack.settings()
    old = datetime.now(UTC) - timedelta(days=120)
    with get_engine(settings).begin() as connection:
        for i, status in enumerate(["succeeded", "failed", "queued", "succeeded"]):
            prompt_id = uuid.uuid4()
            connection.execute(insert(Prompt).values(id=prompt_id, text=f"old {i}", sha256="0" * 64, byte_length=5,
                                                     created_at=old))
            connection.execute(insert(Generation).values(
                id=uuid.uuid4(), prompt_id=prompt_id, model="demo", params={}, max_new_tokens=4, status=status,
                attempts=1, max_attempts=3, archived=False, created_at=old, updated_at=old))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT, timeout=180,
                              env=embedded_stack.process_env({"COLUMNS": "200"}), capture_output=True, text=True)

    done = cli("maintenance", "run", "db.retention")
    assert done.returncode == 0, done.stdout + done.stderr
    with get_engine(settings).connect() as connection:
        assert connection.execute(select(Generation.status)).scalars().all() == ["queued"]
    files = sorted((settings.home / "archive").glob("generations-*.jsonl.gz"))
    assert len(files) == 1 and json.loads(archive.manifest_path(files[0]).read_text())["rows"] == 3
    restored = cli("db", "archive", "restore", str(files[0]))
    assert restored.returncode == 0 and "'restored': 3" in restored.stdout, restored.stdout + restored.stderr
    with get_engine(settings).connect() as connection:
        assert connection.execute(select(func.count()).select_from(Generation)).scalar_one() == 4
    history = cli("maintenance", "history", "--task", "db.retention")
    assert history.returncode == 0 and "succeeded" in history.stdout
