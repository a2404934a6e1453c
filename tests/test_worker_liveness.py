"""Worker liveness: a killed worker's jobs come back in seconds (not a lease), `--all-devices`
replaces it, and a device never has two workers."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid

import pytest
from sqlalchemy import select

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import FINAL_STATUSES, DeviceWorker, Generation
from textnlp_jobs.db.repository import NewJob, Routing, insert_jobs_once
from textnlp_jobs.local_stack import LocalStack, WorkerProcess
from textnlp_jobs.publish import publish_and_mark
from workers.device import worker_hostname

from .conftest import TEST_NODE
from .helpers import assert_each_succeeded_exactly_once, job_specs, statuses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The settings the recovery target is stated for: nothing shortened.
DEFAULT_TIMINGS = ("TEXTNLP_LEASE_SECONDS", "TEXTNLP_MAX_JOB_SECONDS", "TEXTNLP_VISIBILITY_TIMEOUT",
                   "TEXTNLP_RECONCILE_GRACE_SECONDS", "TEXTNLP_DEFAULT_MAX_ATTEMPTS")


FINAL = set(FINAL_STATUSES)


def process_group_alive(group: int) -> bool:
    """A process of the group is still there (the workers run as leaders of their own group)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def device_row(client: Client, name: str) -> DeviceWorker | None:
    with client.sessions() as session:
        return session.execute(select(DeviceWorker).where(DeviceWorker.name == name)).scalar_one_or_none()


def test_a_device_worker_killed_mid_batch_has_every_job_done_within_60s_with_default_settings(
    stack: LocalStack,
) -> None:
    for name in DEFAULT_TIMINGS:
        stack.env.pop(name, None)
    settings = stack.settings()
    assert settings.lease_seconds == 600 and settings.reconcile_interval_seconds == 300
    supervisor = WorkerProcess([sys.executable, "-m", "textnlp_jobs.cli", "worker", "--all-devices"],
                               stack.process_env(), stack.workdir / "supervisor.log")
    stack.workers.append(supervisor)
    supervisor.start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    client = Client(settings)
    ids = [job.id for job in client.submit_many(job_specs(120, max_new_tokens=24))]
    device = f"{TEST_NODE}/cpu.0"
    first = device_row(client, device)
    assert first is not None

    while True:  # kill once jobs have finished and a batch is running
        counts = statuses(client, ids)
        if counts.get("succeeded", 0) >= 20 and counts.get("running", 0) > 0:
            break
        assert supervisor.alive, supervisor.log_tail()
        time.sleep(0.05)
    with client.sessions() as session:  # the killed worker's jobs: running on its device at the kill
        its_jobs = list(session.execute(select(Generation.id).where(
            Generation.id.in_(ids), Generation.status == "running", Generation.worker == device)).scalars())
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert its_jobs

    its_done = None
    while True:
        counts = statuses(client, ids)
        if its_done is None and statuses(client, its_jobs).keys() <= FINAL:
            its_done = time.monotonic() - killed_at
        if counts.get("queued", 0) + counts.get("running", 0) == 0:
            break
        assert time.monotonic() - killed_at < 180, (counts, supervisor.log_tail(60))
        time.sleep(0.1)
    all_done = time.monotonic() - killed_at
    print(f"\nrecovery: the {len(its_jobs)} jobs running on the killed worker were all final {its_done:.1f}s "
          f"after the SIGKILL; all {len(ids)} jobs {all_done:.1f}s after it (default lease "
          f"{settings.lease_seconds:.0f}s, reconcile {settings.reconcile_interval_seconds:.0f}s)")
    assert its_done is not None and its_done < 60, f"the killed worker's jobs took {its_done}s"
    assert_each_succeeded_exactly_once(client, ids, counts, supervisor.log_tail())
    assert max(job.attempts for job in client.get_many(ids)) >= 2  # the killed batch really ran again
    replacement = device_row(client, device)
    assert replacement is not None and replacement.pid != first.pid and replacement.stopped_at is None
    assert supervisor.alive  # the supervisor replaced its worker and kept going


def test_a_second_worker_for_a_device_refuses_to_start(stack: LocalStack) -> None:
    settings = stack.settings()
    first = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    second = stack.device_worker("cpu.0", args=["--models", "tiny"]).start()
    assert second.process is not None and second.process.wait(120) == 2
    assert "config.device_in_use" in second.log_tail() and "already served" in second.log_tail()
    assert "model_loaded" not in second.log_tail(200)  # its engine process was spawned, never told to load
    give_up = time.monotonic() + 30
    while process_group_alive(second.process.pid):  # and was stopped with it
        assert time.monotonic() < give_up, "the refused worker left a process behind"
        time.sleep(0.1)
    assert first.alive


def test_a_pinned_job_for_a_model_its_device_does_not_serve_is_handed_back_not_failed(stack: LocalStack) -> None:
    settings = stack.settings()
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    client = Client(settings)
    # Placement changed after the job was queued: written past submit's check, as an old producer would.
    job = NewJob(prompt="Return a new list", model="tiny", max_new_tokens=8,
                 params={"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None},
                 device=f"{TEST_NODE}/cpu.0", id=uuid.uuid4())
    with client.sessions() as session:
        insert_jobs_once(session, [job])
    publish_and_mark(client.celery, settings, client.sessions, [Routing(job.id, "tiny", job.device, 0)])
    give_up = time.monotonic() + 60
    while "job_handed_back" not in worker.log_tail(200):
        assert time.monotonic() < give_up, worker.log_tail()
        time.sleep(0.2)
    record = client.get(job.id)
    assert record.status == "queued" and record.attempts == 0 and record.error_code is None
