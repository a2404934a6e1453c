"""A queue no worker consumes: its old messages end in textnlp.dead_letter, their jobs are dead with
queue.no_consumer, and `jobs requeue` brings them back once a worker serves the model."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from tests.helpers import wait_until_final
from textnlp_jobs.client import Client
from textnlp_jobs.constants import DEAD_LETTER_QUEUE
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.maintenance.runner import run_maintenance
from workers.device import worker_hostname

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEP = "\x06\x16"


def test_messages_of_a_queue_with_no_consumer_are_dead_lettered_and_requeued_once_served(stack: LocalStack) -> None:
    settings = stack.settings(dead_letter_after_seconds=1)
    client = Client(settings)
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    stack.device_worker("cpu.0").start()  # serves demo only: nobody consumes textnlp.gen.tiny
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    served = client.submit_many([{"prompt": f"Return a new list {i}", "model": "demo", "max_new_tokens": 4}
                                 for i in range(2)])
    orphaned = client.submit_many([{"prompt": f"Read the file and {i}", "model": "tiny", "max_new_tokens": 4}
                                   for i in range(3)])
    # A retired model's queue binding, empty and unused: cache.expire removes it; demo's stays.
    broker.sadd("_kombu.binding.textnlp.gen.retired", f"textnlp.gen.retired{SEP}{SEP}textnlp.gen.retired")
    wait_until_final(client, [j.id for j in served], timeout=120)
    time.sleep(1.5)

    dry = run_maintenance("queues.dead_letter", settings=settings, dry_run=True)
    assert dry["dead_lettered"] == 3 and broker.llen(DEAD_LETTER_QUEUE) == 0
    result = run_maintenance("queues.dead_letter", settings=settings)
    assert result["status"] == "succeeded" and result["dead_lettered"] == 3 and result["jobs_marked_dead"] == 3
    assert "textnlp.gen.demo" in result["consumed_queues"]
    assert broker.llen(DEAD_LETTER_QUEUE) == 3
    assert sum(broker.llen(k) for k in broker.scan_iter(match="textnlp.gen.tiny*")) == 0
    letter = json.loads(broker.lindex(DEAD_LETTER_QUEUE, 0))  # type: ignore[arg-type]
    assert letter["headers"]["x-dead-letter"]["queue"] == "textnlp.gen.tiny"
    for job in client.wait([j.id for j in orphaned], timeout=5):
        assert (job.status, job.error_code) == ("dead", "queue.no_consumer")

    # (With a 1 s window tiny's emptied queue may count as unused too: the requeue below publishes
    # from a fresh process, which declares its binding again.)
    hygiene = run_maintenance("cache.expire", settings=settings)
    assert "textnlp.gen.retired" in hygiene["unused_queues"]
    assert not broker.exists("_kombu.binding.textnlp.gen.retired")
    assert broker.exists("_kombu.binding.textnlp.gen.demo")

    tiny_worker = stack.device_worker("cpu.1", args=["--models", "tiny"]).start()
    stack.wait_ready(worker_hostname(settings, "cpu.1"))
    requeue = subprocess.run(
        [sys.executable, "-m", "textnlp_jobs.cli", "jobs", "requeue", "--status", "dead", "--model", "tiny"],
        cwd=REPO_ROOT, env=stack.process_env({"COLUMNS": "200"}), capture_output=True, text=True, timeout=120)
    assert requeue.returncode == 0 and "'requeued': 3" in requeue.stdout, requeue.stdout + requeue.stderr
    final = wait_until_final(client, [j.id for j in orphaned], timeout=120)
    assert final == {"succeeded": 3}, tiny_worker.log_tail()
    assert broker.llen(DEAD_LETTER_QUEUE) == 0
    assert all(j.attempts == 1 for j in client.wait([j.id for j in orphaned], timeout=5))
    broker.close()
