"""Faults lose no job and write no result twice: SIGKILLed workers, a flushed Redis, a PostgreSQL restart."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import redis

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack, keep_ownership
from workers.device import worker_hostname

from .helpers import job_specs, result_writes, wait_until_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_worker_killed_three_times_mid_batch_loses_no_job_and_writes_none_twice(stack: LocalStack) -> None:
    worker = stack.device_worker("cpu.0").start()
    client = Client(stack.settings())
    jobs = client.submit_many(job_specs(200, max_new_tokens=24))
    ids = [job.id for job in jobs]
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
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
    assert final == {"succeeded": 200}, worker.log_tail()
    writes = result_writes(client, ids)
    assert len(writes) == 200 and set(writes.values()) == {1}
    assert max(job.attempts for job in client.get_many(ids)) >= 2  # some jobs really were re-run


def test_a_flushed_redis_mid_run_is_repaired_by_the_reconciler(stack: LocalStack) -> None:
    worker = stack.device_worker("cpu.0").start()
    client = Client(stack.settings())
    jobs = client.submit_many(job_specs(200, max_new_tokens=24))
    ids = [job.id for job in jobs]
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
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
    assert final == {"succeeded": 200}, worker.log_tail()
    writes = result_writes(client, ids)
    assert len(writes) == 200 and set(writes.values()) == {1}


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
    worker = stack.device_worker("cpu.0").start()
    client = Client(stack.settings())
    jobs = client.submit_many(job_specs(120, max_new_tokens=24))
    ids = [job.id for job in jobs]
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    restarted = []

    def restart_mid_run(counts: dict[str, int]) -> None:
        if not restarted and counts.get("succeeded", 0) >= 30:
            restarted.append(counts)
            restart_postgresql()

    final = wait_until_final(client, ids, timeout=300, reconcile_every=2.0, during=restart_mid_run)
    assert restarted
    assert final == {"succeeded": 120}, worker.log_tail()
    writes = result_writes(client, ids)
    assert len(writes) == 120 and set(writes.values()) == {1}
