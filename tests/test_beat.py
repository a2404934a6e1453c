"""Beat on Redis: two RedBeat beats against one Redis send every tick once, and the light
maintenance worker keeps the reconciler's cadence while the heavy one runs a slow retention."""

from __future__ import annotations

import itertools
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from textnlp_jobs.celery_app import create_app
from textnlp_jobs.db.models import MaintenanceRun
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.local_stack import LocalStack, WorkerProcess, seed_generations
from textnlp_jobs.maintenance.registry import load_tasks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL = 2.0


def fast_schedule() -> str:
    """jobs.reconcile every INTERVAL seconds, every other task off."""
    return json.dumps({name: (INTERVAL if name == "jobs.reconcile" else "off") for name in load_tasks()})


def start(stack: LocalStack, name: str, *args: str, env: dict[str, str]) -> WorkerProcess:
    process = WorkerProcess([sys.executable, *args], stack.process_env(env), stack.workdir / f"{name}.log")
    stack.workers.append(process)
    return process.start()


def runs(stack: LocalStack, task: str) -> list[MaintenanceRun]:
    with session_factory(stack.settings())() as session:
        return list(session.execute(select(MaintenanceRun).where(MaintenanceRun.task == task)
                                    .order_by(MaintenanceRun.started_at)).scalars())


def wait_for(condition: object, timeout: float, what: str, logs: list[WorkerProcess]) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} not after {timeout}s\n" + "\n---\n".join(p.log_tail() for p in logs))


def gaps(moments: list[datetime]) -> list[float]:
    return [(b - a).total_seconds() for a, b in itertools.pairwise(moments)]


def test_two_beats_send_each_tick_once_and_reconcile_keeps_its_cadence_during_a_slow_retention(
        stack: LocalStack, tmp_path: Path) -> None:
    env = {"TEXTNLP_SCHEDULE": fast_schedule(), "TEXTNLP_RETENTION_BATCH": "100",
           "TEXTNLP_RETENTION_BATCH_PAUSE_SECONDS": "0.15", "TEXTNLP_ARCHIVE_DIR": str(tmp_path / "archive")}
    stack.env.update(env)
    seed_generations(stack.settings(), 4_000)  # ~1,950 expired rows: ~60 batches with a pause each
    maintenance = start(stack, "maintenance", "-m", "workers.maintenance", "--loglevel", "INFO", env=env)
    beats = [start(stack, f"beat-{i}", "-m", "textnlp_jobs.cli", "beat", "--loglevel", "INFO", env=env)
             for i in range(2)]
    processes = [maintenance, *beats]
    wait_for(lambda: len(runs(stack, "jobs.reconcile")) >= 2, 120, "two reconcile runs", processes)
    # From here on the worker is consuming, so a run starts when its tick is sent (before, ticks
    # sent while the worker was starting waited in the queue and ran back to back).
    steady_from = datetime.now(UTC)

    celery = create_app(stack.settings())
    celery.send_task("db.retention", queue="textnlp.maintenance.heavy")
    wait_for(lambda: any(r.status != "running" for r in runs(stack, "db.retention")), 180, "the retention",
             processes)
    time.sleep(INTERVAL * 2)
    # Read the beats' logs before stopping them: once the lock holder exits, RedBeat rightly lets
    # the other beat take over, and it may send a tick in the moment before its own stop.
    beat_logs = [b.log_tail(100_000) for b in beats]
    for process in processes:
        process.stop()

    senders = [log for log in beat_logs if "Sending due task" in log]
    assert len(senders) == 1, "exactly one beat held RedBeat's lock and sent"
    retention = runs(stack, "db.retention")[0]
    assert retention.status == "succeeded", retention.result
    assert retention.finished_at is not None
    reconciles = [r for r in runs(stack, "jobs.reconcile") if r.started_at >= steady_from]
    starts = [r.started_at for r in reconciles]
    # Every tick sent once: no run was refused by the lock, and no two runs share a tick.
    assert {r.status for r in reconciles} == {"succeeded"}, [(r.started_at, r.status) for r in reconciles]
    assert min(gaps(starts)) > INTERVAL / 2, gaps(starts)
    span = (starts[-1] - starts[0]).total_seconds()
    assert len(starts) <= span / INTERVAL + 2
    # During the retention the light worker kept reconciling on time.
    during = [s for s in starts if retention.started_at <= s <= retention.finished_at]
    window = [s for s in starts if s < retention.started_at][-1:] + during + \
        [s for s in starts if s > retention.finished_at][:1]
    longest = max(gaps(window))
    retention_seconds = (retention.finished_at - retention.started_at).total_seconds()
    print(f"\nretention ran {retention_seconds:.1f}s; {len(during)} reconcile runs during it; longest gap "
          f"between reconcile runs {longest:.2f}s (schedule: every {INTERVAL:g}s); ticks over {span:.1f}s: "
          f"{len(starts)}")
    assert retention_seconds > 3 * INTERVAL and len(during) >= 2
    assert longest < 3 * INTERVAL
