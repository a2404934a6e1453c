"""Faults lose no job and write no result twice: SIGKILLed workers, a flushed Redis, a PostgreSQL restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
import redis

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack, WorkerProcess, keep_ownership
from workers.device import worker_hostname

from .helpers import assert_each_succeeded_exactly_once, job_specs, wait_until_final


def start_run(stack: LocalStack, count: int, *, max_batch: int | None = None) -> tuple[WorkerProcess, Client,
                                                                                      list[uuid.UUID]]:
    """A device worker and ``count`` jobs submitted to it, the worker ready. ``max_batch`` slows the
    worker down where a test must catch the run in the middle (a worker taking its messages in
    groups finished 200 jobs before the first poll)."""
    batching = {"*": {"max_batch": max_batch, "max_wait_ms": 20}}
    extra_env = {"TEXTNLP_BATCHING": json.dumps(batching)} if max_batch else None
    worker = stack.device_worker("cpu.0", extra_env=extra_env).start()
    client = Client(stack.settings())
    ids = [job.id for job in client.submit_many(job_specs(count, max_new_tokens=24))]
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    return worker, client, ids

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_worker_killed_three_times_mid_batch_loses_no_job_and_writes_none_twice(stack: LocalStack) -> None:
    worker, client, ids = start_run(stack, 200, max_batch=2)
    kill_points = [30, 80, 130]
    kills = []

    def kill_on_progress(counts: dict[str, int]) -> None:
        # Kill while jobs are running (mid-batch), then restart, at three points of the run.
        if kill_points and counts.get("succeeded", 0) >= kill_points[0] and counts.get("running", 0) > 0:
            kill_points.pop(0)
            kills.append(counts.get("running", 0))
            worker.kill()
            worker.start()

    final = wait_until_final(client, ids, timeout=420, reconcile_every=2.0, during=kill_on_progress)
    assert len(kills) == 3 and all(running > 0 for running in kills), (kills, final)
    assert_each_succeeded_exactly_once(client, ids, final, worker.log_tail())
    assert max(job.attempts for job in client.get_many(ids)) >= 2  # some jobs really were re-run


def test_a_flushed_redis_mid_run_is_repaired_by_the_reconciler(stack: LocalStack) -> None:
    # 600 jobs: a device worker that takes its messages in groups runs 200 of these in about a
    # second, so with 200 the queue could be empty before the first poll saw 40 succeed.
    worker, client, ids = start_run(stack, 600)
    flushed = []

    def flush_mid_run(counts: dict[str, int]) -> None:
        if not flushed and counts.get("succeeded", 0) >= 40:
            broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
            # kombu keeps one list per priority: textnlp.gen.demo, textnlp.gen.demo\x06\x169, ...
            flushed.append(sum(broker.llen(key) for key in broker.scan_iter(match="textnlp.gen.demo*")))
            broker.flushdb()  # the test's own database number: every message is forgotten
            broker.close()
            keep_ownership(stack.env["TEXTNLP_BROKER_URL"])

    final = wait_until_final(client, ids, timeout=300, reconcile_every=2.0, during=flush_mid_run)
    assert flushed and flushed[0] > 0, "the flush happened while messages were waiting"
    assert_each_succeeded_exactly_once(client, ids, final, worker.log_tail())


def restart_postgresql() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
                   check=True, capture_output=True, timeout=120)
    for _ in range(60):
        if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"], check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("PostgreSQL did not come back")


@pytest.mark.skipif(not shutil.which("pg_ctlcluster") or os.geteuid() != 0,
                    reason="restarting PostgreSQL needs pg_ctlcluster as root")
def test_a_postgresql_restart_mid_run_loses_no_job_and_writes_none_twice(stack: LocalStack) -> None:
    worker, client, ids = start_run(stack, 120)
    restarted = []

    def restart_mid_run(counts: dict[str, int]) -> None:
        if not restarted and counts.get("succeeded", 0) >= 30:
            restarted.append(counts)
            restart_postgresql()

    final = wait_until_final(client, ids, timeout=300, reconcile_every=2.0, during=restart_mid_run)
    assert restarted
    assert_each_succeeded_exactly_once(client, ids, final, worker.log_tail())
