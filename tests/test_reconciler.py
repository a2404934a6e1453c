"""The reconciler's four moves, each checked against the real ledger and broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import Generation, MaintenanceRun
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.maintenance.locks import maintenance_lock
from textnlp_jobs.maintenance.runner import run_maintenance

pytestmark = [pytest.mark.integration]


def age(client: Client, ids: list, **values: object) -> None:
    with client.sessions.begin() as session:
        session.execute(update(Generation).where(Generation.id.in_(ids)).values(**values))


def reconcile(client: Client, dry_run: bool = False) -> dict:
    return run_maintenance("jobs.reconcile", settings=client.settings, celery=client.celery, dry_run=dry_run)


def test_queued_jobs_whose_message_is_still_waiting_are_left_alone(stack: LocalStack) -> None:
    client = Client(stack.settings())
    jobs = client.submit_many([{"prompt": f"p {i}", "model": "demo"} for i in range(3)])
    age(client, [j.id for j in jobs], published_at=datetime.now(UTC) - timedelta(minutes=10))
    assert reconcile(client)["republished"] == 0


def test_queued_jobs_with_no_message_are_published_again(stack: LocalStack) -> None:
    import redis

    client = Client(stack.settings())
    jobs = client.submit_many([{"prompt": f"p {i}", "model": "demo"} for i in range(3)])
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    for key in broker.scan_iter(match="textnlp.gen.*"):
        broker.delete(key)
    age(client, [j.id for j in jobs], published_at=datetime.now(UTC) - timedelta(minutes=10))
    assert reconcile(client, dry_run=True)["republished"] == 3
    assert reconcile(client)["republished"] == 3
    assert sum(broker.llen(k) for k in broker.scan_iter(match="textnlp.gen.*")) == 3
    assert reconcile(client)["republished"] == 0  # freshly published: inside the grace period
    broker.close()


def test_running_jobs_past_their_lease_are_rescued_and_exhausted_ones_buried(stack: LocalStack) -> None:
    client = Client(stack.settings())
    stuck, poisoned = client.submit_many([{"prompt": "a b", "model": "demo"}, {"prompt": "c d", "model": "demo"}])
    past = datetime.now(UTC) - timedelta(seconds=1)
    age(client, [stuck.id], status="running", attempts=1, lease_expires_at=past)
    age(client, [poisoned.id], status="running", attempts=6, max_attempts=6, lease_expires_at=past)
    report = reconcile(client)
    assert (report["rescued"], report["buried"]) == (1, 1)
    assert client.get(stuck.id).status == "queued"
    dead = client.get(poisoned.id)
    assert (dead.status, dead.error_code) == ("dead", "job.max_attempts")


def test_queued_jobs_past_their_deadline_expire(stack: LocalStack) -> None:
    client = Client(stack.settings())
    job = client.submit("a b", model="demo", deadline=datetime.now(UTC) + timedelta(minutes=1))
    age(client, [job.id], deadline=datetime.now(UTC) - timedelta(seconds=1))
    assert reconcile(client)["expired"] == 1
    assert client.get(job.id).status == "expired"


def test_a_second_run_while_one_holds_the_lock_exits_locked_and_runs_are_recorded(stack: LocalStack) -> None:
    client = Client(stack.settings())
    with maintenance_lock(client.settings, "jobs.reconcile") as held:
        assert held
        assert reconcile(client) == {"status": "locked"}
    assert reconcile(client)["status"] == "succeeded"
    with client.sessions() as session:
        runs = session.query(MaintenanceRun).all()
    assert sorted((r.task, r.status) for r in runs) == [("jobs.reconcile", "locked"), ("jobs.reconcile", "succeeded")]


def test_queued_jobs_whose_queue_has_no_consumer_are_flagged_not_left_silent(stack: LocalStack) -> None:
    from textnlp_jobs.db import device_workers
    from textnlp_jobs.db.models import DeviceWorker
    from textnlp_jobs.devices import Device

    client = Client(stack.settings(no_consumer_seconds=30))
    device = Device.parse("cpu.3", client.settings.node_name)
    with client.sessions.begin() as session:
        device_workers.register(session, device, ["demo"], "gone", 15.0)
    pinned = client.submit("Return a new list", model="demo", device="cpu.3")
    with client.sessions.begin() as session:  # its worker last beat an hour ago
        session.execute(update(DeviceWorker).values(heartbeat_at=datetime.now(UTC) - timedelta(hours=1)))
    report = reconcile(client)
    assert report["no_consumer"] == 1
    flagged = client.get(pinned.id)
    assert (flagged.status, flagged.error_code) == ("queued", "queue.no_consumer")
    assert "cpu.3" in (flagged.error_message or "")
    assert reconcile(client)["no_consumer"] == 0  # flagged once, not on every pass
