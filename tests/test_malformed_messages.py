"""No message can stop a device worker: whatever is pushed into its queues, a message it cannot
use ends in ``textnlp.dead_letter`` with the reason, and the jobs around it still run."""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from typing import Any

import pytest
import redis

from textnlp_jobs.celery_app import create_app
from textnlp_jobs.client import Client
from textnlp_jobs.constants import DEAD_LETTER_QUEUE
from textnlp_jobs.local_stack import LocalStack
from workers.device import worker_hostname

from .helpers import job_specs, wait_until_final

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUE = "textnlp.gen.demo"


def dead_letters(broker: redis.Redis) -> list[dict[str, Any]]:
    """The records in the dead-letter queue (kombu keeps one list per priority step)."""
    records = []
    for key in broker.scan_iter(match=f"{DEAD_LETTER_QUEUE}*", _type="list"):
        for item in broker.lrange(key, 0, -1):
            envelope = json.loads(item)
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            records.append(json.loads(body))
    return records


def envelope_template(stack: LocalStack) -> dict[str, Any]:
    """A real Celery envelope for ``textnlp.generate``, as kombu stores it in Redis."""
    celery = create_app(stack.settings())
    try:
        celery.send_task("textnlp.generate", args=[str(uuid.uuid4())], queue="textnlp.scratch")
    finally:
        celery.close()
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    raw = broker.rpop("textnlp.scratch")
    broker.close()
    assert raw is not None
    template: dict[str, Any] = json.loads(raw)
    template["properties"]["delivery_info"]["routing_key"] = QUEUE
    return template


def malformed_messages(template: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Twenty messages of different shapes, none of which can run a job."""

    def variant(change: Any) -> bytes:
        envelope = copy.deepcopy(template)
        change(envelope)
        return json.dumps(envelope).encode()

    def body(value: bytes) -> Any:
        return lambda e: e.update(body=base64.b64encode(value).decode())

    def header(**values: Any) -> Any:
        return lambda e: e["headers"].update(values)

    def task_args(args: Any) -> Any:
        return body(json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None,
                                             "chord": None}]).encode())

    return [
        ("text", b"not json"),
        ("list", b"[1,2,3]"),
        ("string", b'"a string"'),
        ("number", b"42"),
        ("null", b"null"),
        ("invalid utf-8", b"\xff\xfe\xfa"),
        ("empty object", b"{}"),
        ("no properties", variant(lambda e: e.pop("properties"))),
        ("properties not an object", variant(lambda e: e.update(properties="x"))),
        ("no delivery tag", variant(lambda e: e["properties"].pop("delivery_tag"))),
        ("no delivery info", variant(lambda e: e["properties"].pop("delivery_info"))),
        ("headers not an object", variant(lambda e: e.update(headers="x"))),
        ("body not text", variant(lambda e: e.update(body=123))),
        ("body not base64", variant(lambda e: e.update(body="!!! not base64 !!!"))),
        ("no headers", variant(lambda e: e.update(headers=None))),
        ("unknown task", variant(header(task="no.such.task"))),
        ("no task id", variant(lambda e: e["headers"].pop("id"))),
        ("body not json", variant(body(b"not json at all"))),
        ("no arguments", variant(task_args([]))),
        ("argument not a job id", variant(task_args(["../../etc/passwd"]))),
    ]


def test_malformed_queue_items_are_dead_lettered_and_the_worker_keeps_consuming(stack: LocalStack) -> None:
    settings = stack.settings()
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    broker.lpush(QUEUE, b"not json")
    broker.lpush(QUEUE, b"[1,2,3]")
    client = Client(settings)
    jobs = client.submit_many(job_specs(4))
    done = client.wait([job.id for job in jobs], timeout=120)
    assert {job.status for job in done} == {"succeeded"}, worker.log_tail()
    assert worker.alive and worker.starts == 1
    reasons = sorted(record["reason"] for record in dead_letters(broker))
    assert reasons == ["envelope_not_an_object", "not_json"]
    assert sorted(record["message"] for record in dead_letters(broker)) == ["[1,2,3]", "not json"]
    broker.close()


def test_a_hundred_jobs_run_while_twenty_malformed_messages_are_pushed_among_them(stack: LocalStack) -> None:
    settings = stack.settings()
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    first_pid = worker.process.pid if worker.process else None
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    messages = malformed_messages(envelope_template(stack))
    assert len(messages) == 20
    client = Client(settings)
    ids = [job.id for job in client.submit_many(job_specs(50))]
    for _, raw in messages[:10]:
        broker.lpush(QUEUE, raw)
    ids += [job.id for job in client.submit_many(job_specs(50))]
    for _, raw in messages[10:]:
        broker.lpush(QUEUE, raw)
        time.sleep(0.05)
    # The reconciler runs as beat would: a job retried after a timeout on this loaded machine
    # waits for it to be sent again.
    final = wait_until_final(client, ids, timeout=400, reconcile_every=2.0)
    assert final == {"succeeded": 100}, worker.log_tail()
    give_up = time.monotonic() + 30
    while len(dead_letters(broker)) < 20 and time.monotonic() < give_up:
        time.sleep(0.2)
    records = dead_letters(broker)
    assert len(records) == 20, ([r["reason"] for r in records], worker.log_tail(80))
    assert all(record["source_queue"] == QUEUE for record in records)
    assert worker.alive and worker.starts == 1 and worker.process and worker.process.pid == first_pid
    assert "Unrecoverable error" not in worker.log_tail(2000)
    assert "Connection to broker lost" not in worker.log_tail(2000)
    broker.close()
