"""Generation jobs end to end: real Redis, real PostgreSQL, real worker processes, real demo model."""

from __future__ import annotations

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack
from workers.device import worker_hostname

from .helpers import job_specs, result_writes, wait_until_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_hundred_jobs_submitted_together_all_succeed_with_text(stack: LocalStack) -> None:
    worker = stack.device_worker("cpu.0").start()
    client = Client(stack.settings())
    jobs = client.submit_many(job_specs(200))
    assert len({job.id for job in jobs}) == 200
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    done = client.wait([job.id for job in jobs], timeout=300)
    assert [job.status for job in done] == ["succeeded"] * 200, worker.log_tail()
    assert all(job.text and job.tokens_generated and job.tokens_generated >= 1 for job in done)
    assert all(job.attempts == 1 for job in done)
    assert max(job.batch_size or 0 for job in done) > 1  # the worker batched
    assert set(result_writes(client, [j.id for j in jobs]).values()) == {1}


def test_the_embedded_default_runs_twenty_jobs_with_no_servers(embedded_stack: LocalStack) -> None:
    settings = embedded_stack.settings()
    assert settings.embedded and settings.database_url_value().startswith("sqlite")
    embedded_stack.device_worker("cpu.0").start()
    client = Client(settings)
    jobs = client.submit_many(job_specs(20))
    final = wait_until_final(client, [j.id for j in jobs], timeout=240)
    assert final == {"succeeded": 20}, embedded_stack.workers[0].log_tail()
    assert all(job.text for job in client.get_many([j.id for j in jobs]))


def test_resubmitting_with_the_same_idempotency_key_returns_the_same_job(stack: LocalStack) -> None:
    client = Client(stack.settings())
    first = client.submit("Return a new list", model="demo", idempotency_key="order-42")
    again = client.submit("Return a new list", model="demo", idempotency_key="order-42")
    batch = client.submit_many([{"prompt": "Return a new list", "model": "demo", "idempotency_key": "order-42"},
                                {"prompt": "x y", "model": "demo", "idempotency_key": "order-43"},
                                {"prompt": "x y", "model": "demo", "idempotency_key": "order-43"}])
    assert again.id == first.id == batch[0].id
    assert batch[1].id == batch[2].id != first.id
    assert len(client.list(limit=10)) == 2


def test_a_cancelled_queued_job_is_never_run(stack: LocalStack) -> None:
    client = Client(stack.settings())
    job = client.submit("Return a new list", model="demo")
    assert client.cancel(job.id).status == "cancelled"
    stack.device_worker("cpu.0").start()
    other = client.submit("Create a new thread", model="demo")
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    assert client.wait(other.id, timeout=120).status == "succeeded"
    after = client.get(job.id)
    assert after.status == "cancelled" and after.text is None and after.attempts == 0
