"""JSON only: a pickled message is refused and runs nothing."""

from __future__ import annotations

import pickle
import time

import pytest
from kombu import Connection, Producer

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack
from workers.device import worker_hostname

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Boom:
    """Unpickling this would create a file: proof that pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_message_with_a_pickle_content_type_is_refused_and_runs_nothing(stack: LocalStack, tmp_path) -> None:
    settings = stack.settings()
    client = Client(settings)
    victim = client.submit("Return a new list", model="demo")
    client.cancel(victim.id)  # keep its JSON message from running it; we only want the pickled one
    marker = tmp_path / "pickle-ran"
    with Connection(settings.broker_url_value()) as connection:
        producer = Producer(connection.default_channel)
        body = pickle.dumps(((str(victim.id), Boom(str(marker))), {}, {}))
        producer.publish(
            body, routing_key="textnlp.gen.demo", content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"id": str(victim.id), "task": "textnlp.generate", "lang": "py"},
        )
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    canary = client.submit("Create a new thread", model="demo")
    assert client.wait(canary.id, timeout=120).status == "succeeded"  # the worker consumed past it
    time.sleep(0.5)
    assert not marker.exists()
    log = worker.log_tail(200)
    assert "pickle" in log.lower() and ("disallowed" in log.lower() or "refusing" in log.lower()), log
    assert client.get(victim.id).attempts == 0
