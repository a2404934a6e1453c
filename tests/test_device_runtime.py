"""The per-job protocol of a device (claim, batch, write once) against the real ledger, with the
stub engine so the test can hold a batch open."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from textnlp_jobs.client import Client
from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import Generation
from textnlp_jobs.inference.device import DeviceRuntime
from textnlp_jobs.inference.engine import StubEngine
from textnlp_jobs.local_stack import LocalStack

from .helpers import job_specs, result_writes

pytestmark = [pytest.mark.integration]


def start_runtime(client: Client, engine: StubEngine) -> DeviceRuntime:
    runtime = DeviceRuntime(client.settings, client.sessions, {"demo": engine}, worker_name="test/cpu.0",
                            republish=lambda routings: None)
    runtime.start()
    return runtime


def run_in_thread(runtime: DeviceRuntime, job_id: uuid.UUID, outcomes: dict[uuid.UUID, str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: outcomes.__setitem__(job_id, runtime.run_job(job_id)))
    thread.start()
    return thread


def wait_for_status(client: Client, job_id: uuid.UUID, status: str) -> None:
    for _ in range(200):
        if client.get(job_id).status == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"{job_id} never became {status}")


def test_a_job_cancelled_while_its_batch_gathers_is_never_generated(stack: LocalStack) -> None:
    client = Client(stack.settings(batching={"*": {"max_batch": 3, "max_wait_ms": 10_000}}))
    first, second, third = client.submit_many(job_specs(3))
    engine = StubEngine("demo")
    runtime = start_runtime(client, engine)
    outcomes: dict[uuid.UUID, str] = {}
    threads = [run_in_thread(runtime, job.id, outcomes) for job in (first, second)]
    wait_for_status(client, first.id, "running")  # claimed, waiting in the batcher
    client.cancel(first.id)
    threads.append(run_in_thread(runtime, third.id, outcomes))  # fills the batch: it runs now
    for thread in threads:
        thread.join(10)
    runtime.stop()
    assert outcomes == {first.id: "cancelled", second.id: "succeeded", third.id: "succeeded"}
    assert engine.batches == [2]
    cancelled = client.get(first.id)
    assert (cancelled.status, cancelled.text) == ("cancelled", None)
    assert result_writes(client, [first.id, second.id, third.id]) == {str(second.id): 1, str(third.id): 1}


def test_a_second_delivery_of_a_finished_job_writes_nothing(stack: LocalStack) -> None:
    client = Client(stack.settings())
    (job,) = client.submit_many(job_specs(1))
    runtime = start_runtime(client, StubEngine("demo"))
    try:
        assert runtime.run_job(job.id) == "succeeded"
        assert runtime.run_job(job.id) == "not_queued"  # the broker redelivered the same message
    finally:
        runtime.stop()
    assert result_writes(client, [job.id]) == {str(job.id): 1}


def test_an_out_of_memory_batch_is_split_and_every_job_completes(stack: LocalStack) -> None:
    client = Client(stack.settings(batching={"*": {"max_batch": 4, "max_wait_ms": 2_000}}))
    jobs = client.submit_many(job_specs(4))
    engine = StubEngine("demo", fail_above=1)
    runtime = start_runtime(client, engine)
    outcomes: dict[uuid.UUID, str] = {}
    for thread in [run_in_thread(runtime, job.id, outcomes) for job in jobs]:
        thread.join(10)
    runtime.stop()
    assert set(outcomes.values()) == {"succeeded"}
    assert engine.batches == [1, 1, 1, 1]


def test_a_job_waiting_when_the_worker_stops_goes_back_to_the_queue_and_is_republished(stack: LocalStack) -> None:
    client = Client(stack.settings(batching={"*": {"max_batch": 4, "max_wait_ms": 10_000}}))
    (job,) = client.submit_many(job_specs(1))
    republished: list[object] = []
    runtime = DeviceRuntime(client.settings, client.sessions, {"demo": StubEngine("demo")},
                            worker_name="test/cpu.0", republish=republished.extend)
    runtime.start()
    outcomes: dict[uuid.UUID, str] = {}
    thread = run_in_thread(runtime, job.id, outcomes)
    wait_for_status(client, job.id, "running")
    runtime.stop()
    thread.join(10)
    assert outcomes == {job.id: "released"}
    after = client.get(job.id)
    assert (after.status, after.attempts) == ("queued", 0)
    assert [r.id for r in republished] == [job.id]  # type: ignore[attr-defined]


def test_the_drop_check_names_exactly_the_claims_not_worth_generating(stack: LocalStack) -> None:
    """Cancelled, re-leased (another attempt owns the row), past its deadline, or unknown: gone.
    Claimed and on time, with or without a deadline: kept."""
    client = Client(stack.settings())
    soon = datetime.now(UTC) + timedelta(hours=1)
    jobs = client.submit_many([{"prompt": f"Return a new list {i}", "model": "demo", "deadline": soon}
                               for i in range(3)] + [{"prompt": f"Raise an exception if {i}", "model": "demo"}
                                                     for i in range(3)])
    ids = [job.id for job in jobs]
    with client.sessions.begin() as session:
        claimed = repo.claim_many(session, ids, "test/cpu.0", 600)
    assert all(outcome.job is not None for outcome in claimed.values())
    cancelled, overdue, kept_with_deadline, released, kept, _ = ids
    client.cancel(cancelled)
    with client.sessions.begin() as session:
        session.execute(update(Generation).where(Generation.id == overdue)
                        .values(deadline=datetime.now(UTC) - timedelta(seconds=1)))
        session.execute(update(Generation).where(Generation.id == released).values(attempts=2))
    unknown = uuid.uuid4()
    with client.sessions() as session:
        gone = repo.cancelled_or_overdue(session, [(job_id, 1) for job_id in ids] + [(unknown, 1)])
    assert gone == {cancelled, overdue, released, unknown}
    assert kept_with_deadline not in gone and kept not in gone


def test_jobs_delivered_one_by_one_under_load_share_one_claim(stack: LocalStack) -> None:
    # A mixed workload's rows free one or two per decode step, so deliveries trickle in; each
    # claim is a transaction whatever its size, so under load they are gathered (groups.py).
    client = Client(stack.settings(group_spacing_ms=1_000))
    jobs = client.submit_many(job_specs(6))
    runtime = start_runtime(client, StubEngine("demo"))
    claims: list[int] = []
    claim_group = runtime._claim_group
    runtime._claim_group = lambda ids: claims.append(len(ids)) or claim_group(ids)  # type: ignore[method-assign]
    outcomes: dict[uuid.UUID, str] = {}
    try:
        assert runtime.run_job(jobs[0].id) == "succeeded"  # after a quiet spell: claimed at once, alone
        assert runtime.run_job(jobs[1].id) == "succeeded"  # and the next group at once too
        threads = []
        for job in jobs[2:]:
            threads.append(run_in_thread(runtime, job.id, outcomes))
            time.sleep(0.02)
        for thread in threads:
            thread.join(60)
    finally:
        runtime.stop()
    assert claims == [1, 1, 4]
    assert set(outcomes.values()) == {"succeeded"} and len(outcomes) == 4
    assert result_writes(client, [j.id for j in jobs]) == {str(j.id): 1 for j in jobs}


@pytest.mark.parametrize(("device", "setting_ms", "spacing"), [
    ("test/cpu.0", None, 0.025), ("test/cuda.0", None, 0.0), ("test/cuda.0", 40, 0.04), ("test/cpu.0", 0, 0.0),
])
def test_claims_and_writes_are_spaced_by_default_on_a_cpu_device_only(
        stack: LocalStack, device: str, setting_ms: float | None, spacing: float) -> None:
    # On a CPU the worker's statements cost the model's own cores; a GPU's worker has cores of its
    # own, where spacing would only delay claims and writes (settings.DEFAULT_GROUP_SPACING_MS).
    client = Client(stack.settings(group_spacing_ms=setting_ms))
    runtime = DeviceRuntime(client.settings, client.sessions, {"demo": StubEngine("demo")}, worker_name=device,
                            republish=lambda routings: None)
    assert runtime.intake.spacing == pytest.approx(spacing)
    assert runtime.finishing.spacing == pytest.approx(spacing)
