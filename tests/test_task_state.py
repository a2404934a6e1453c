"""Celery (and so Flower) sees a job that ended failed or dead as a failed task, while the row is
written once and the message is acked like any other."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import update

from textnlp_jobs.celery_app import create_app
from textnlp_jobs.client import Client
from textnlp_jobs.constants import KOMBU_UNACKED_KEY
from textnlp_jobs.db.models import Generation
from textnlp_jobs.db.repository import NewJob, Routing, insert_jobs_once
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.publish import publish_and_mark
from workers.device import worker_hostname

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_dead_job_is_a_failed_task_and_a_good_one_a_succeeded_task(stack: LocalStack) -> None:
    settings = stack.settings()
    worker = stack.device_worker("cpu.0", extra_env={"TEXTNLP_TASK_EVENTS": "true"}).start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    client = Client(settings)
    events: dict[str, str] = {}
    listening = threading.Event()
    celery = create_app(settings)

    def listen() -> None:
        with celery.connection_for_read() as connection:
            receiver = celery.events.Receiver(connection, handlers={
                "task-failed": lambda event: events.__setitem__(event["uuid"], "failed"),
                "task-succeeded": lambda event: events.__setitem__(event["uuid"], "succeeded"),
            })
            listening.set()
            try:
                receiver.capture(limit=None, timeout=60, wakeup=False)
            except TimeoutError:
                pass

    threading.Thread(target=listen, daemon=True).start()
    assert listening.wait(30)
    time.sleep(1)
    # A poison job: its attempts are used up, so the worker buries it (dead) instead of running it.
    poison = NewJob(prompt="Return a new list", model="demo", max_new_tokens=8, max_attempts=1,
                    params={"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}, id=uuid.uuid4())
    with client.sessions() as session:
        insert_jobs_once(session, [poison])
    with client.sessions.begin() as session:
        session.execute(update(Generation).where(Generation.id == poison.id).values(attempts=1))
    publish_and_mark(client.celery, settings, client.sessions, [Routing(poison.id, "demo", None, 0)])
    good = client.submit("Create a new thread", model="demo", max_new_tokens=8)

    give_up = time.monotonic() + 60
    while len(events) < 2 and time.monotonic() < give_up:
        time.sleep(0.1)
    assert events.get(str(poison.id)) == "failed", (events, worker.log_tail())
    assert events.get(str(good.id)) == "succeeded"
    assert client.get(poison.id).status == "dead" and client.get(good.id).status == "succeeded"
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    unacked: Any = broker.hlen(KOMBU_UNACKED_KEY)
    broker.close()
    assert unacked == 0  # both messages acked: the failure is not redelivered
    assert "Traceback" not in worker.log_tail(200)
