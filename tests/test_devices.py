"""Device workers: competing consumers on a model queue, and pinned jobs on one device only."""

from __future__ import annotations

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack
from workers.device import worker_hostname

from .conftest import TEST_NODE
from .helpers import job_specs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_devices_share_one_model_queue_and_a_pinned_job_runs_only_on_its_device(stack: LocalStack) -> None:
    settings = stack.settings()
    one_thread = ["--torch-threads", "1"]  # two workers on a 2-core machine
    for device in ("cpu.0", "cpu.1"):
        stack.device_worker(device, args=one_thread).start()
    for device in ("cpu.0", "cpu.1"):
        stack.wait_ready(worker_hostname(settings, device))
    client = Client(settings)
    shared = client.submit_many(job_specs(60, max_new_tokens=16))
    pinned = client.submit_many(job_specs(6, device="cpu.1") + job_specs(2, device=f"{TEST_NODE}/cpu.1"))
    done = client.wait([j.id for j in shared + pinned], timeout=300)
    assert {job.status for job in done} == {"succeeded"}
    by_id = {job.id: job for job in done}
    shared_workers = {by_id[j.id].worker for j in shared}
    assert shared_workers == {f"{TEST_NODE}/cpu.0", f"{TEST_NODE}/cpu.1"}, "both devices did work"
    assert {by_id[j.id].worker for j in pinned} == {f"{TEST_NODE}/cpu.1"}
