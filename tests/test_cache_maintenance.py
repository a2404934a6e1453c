"""cache.expire and cache.memory on the real Redis: exactly the idle keys with no TTL under the
system's prefix go, nothing outside it is touched, and kombu's stale leftovers are cleared."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from textnlp_jobs.client import Client
from textnlp_jobs.constants import KOMBU_UNACKED_INDEX_KEY, KOMBU_UNACKED_KEY
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.maintenance.runner import run_maintenance

pytestmark = [pytest.mark.integration]

KEYS = 100_000
IDLE_POLICY = 6


def fill(client: redis.Redis, count: int) -> tuple[list[str], list[str]]:
    """``count`` keys under the system's prefix, 10% of them without a TTL. Returns (no-TTL, TTL) names."""
    without, with_ttl = [], []
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            key = f"textnlp:cache:test:{i}"
            if i % 10 == 0:
                pipe.set(key, "v")
                without.append(key)
            else:
                pipe.set(key, "v", ex=3600)
                with_ttl.append(key)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    return without, with_ttl


def test_cache_expire_removes_exactly_the_idle_keys_without_a_ttl_under_its_prefixes(stack: LocalStack) -> None:
    client = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    without, with_ttl = fill(client, KEYS)
    outside = [f"other:app:{i}" for i in range(500)] + ["textnlp.gen.demo.notalist", "unrelated"]
    for key in outside:
        client.set(key, "v")
    client.set("textnlp:lock:some.task", "held")  # locks and RedBeat's schedule never expire
    client.hset("textnlp:redbeat:db.vacuum", "definition", "{}")
    time.sleep(IDLE_POLICY + 2)
    touched = without[::2]  # read again: no longer idle
    with client.pipeline(transaction=False) as pipe:
        for key in touched:
            pipe.get(key)
        pipe.execute()
    settings = stack.settings(cache_idle_seconds=IDLE_POLICY)
    started = time.monotonic()
    result = run_maintenance("cache.expire", settings=settings)
    seconds = time.monotonic() - started
    print(f"\ncache.expire over {KEYS} keys: {seconds:.2f}s, removed {result['removed']}")
    idle = set(without) - set(touched)
    assert result["status"] == "succeeded" and result["removed"] == len(idle)
    with client.pipeline(transaction=False) as pipe:
        for key in without + with_ttl:
            pipe.exists(key)
        present = pipe.execute()
    remaining = {key for key, here in zip(without + with_ttl, present, strict=True) if here}
    assert remaining == set(touched) | set(with_ttl)
    assert all(client.exists(key) for key in [*outside, "textnlp:lock:some.task", "textnlp:redbeat:db.vacuum"])
    client.close()


def unacked_entry(job_id: str, tag: str) -> str:
    message = {"headers": {"id": job_id, "task": "textnlp.generate"}, "properties": {"delivery_tag": tag},
               "body": ""}
    return json.dumps([message, "", "textnlp.gen.demo"])


def test_stale_unacked_deliveries_of_finished_jobs_are_cleared_and_others_kept(stack: LocalStack) -> None:
    client_api = Client(stack.settings())
    finished, queued = client_api.submit_many([{"prompt": "a b", "model": "demo"}, {"prompt": "c d", "model": "demo"}])
    client_api.cancel(finished.id)
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    old, recent = time.time() - 3600, time.time()
    entries = {"t-final-old": (finished.id, old), "t-queued-old": (queued.id, old),
               "t-final-recent": (finished.id, recent), "t-unknown-old": (uuid.uuid4(), old)}
    for tag, (job, when) in entries.items():
        broker.hset(KOMBU_UNACKED_KEY, tag, unacked_entry(str(job), tag))
        broker.zadd(KOMBU_UNACKED_INDEX_KEY, {tag: when})
    dry = run_maintenance("cache.expire", settings=stack.settings(), dry_run=True)
    assert dry["stale_unacked"] == 1 and broker.hlen(KOMBU_UNACKED_KEY) == 4
    result = run_maintenance("cache.expire", settings=stack.settings())
    assert result["stale_unacked"] == 1
    assert {t.decode() for t in broker.hkeys(KOMBU_UNACKED_KEY)} == {"t-queued-old", "t-final-recent", "t-unknown-old"}
    assert broker.zscore(KOMBU_UNACKED_INDEX_KEY, "t-final-old") is None
    broker.close()


def test_cache_memory_reports_usage_fragmentation_and_largest_keys_by_prefix(stack: LocalStack) -> None:
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    broker.set("textnlp:cache:big", "x" * 200_000)
    broker.set("textnlp:cache:small", "x")
    Client(stack.settings()).submit("a b", model="demo")
    result = run_maintenance("cache.memory", settings=stack.settings())
    assert result["status"] == "succeeded" and result["used_memory"] > 0 and result["fragmentation_ratio"] > 0
    group = result["by_prefix"]["textnlp:cache"]
    assert group["keys"] == 2 and group["largest"][0][0] == "textnlp:cache:big"
    assert "textnlp.gen.demo" in result["by_prefix"]
    assert result["purged"] == result["allocator"].startswith("jemalloc")
    broker.close()
