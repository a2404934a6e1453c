#!/usr/bin/env python
"""Maintenance at scale on the real PostgreSQL and Redis of this machine (scratch database and
Redis database number, removed afterwards).

    python bench/maintenance.py                                   # 1,000,000 rows and 1,000,000 keys
    python bench/maintenance.py --rows 100000 --keys 100000 --skip-baseline

1. ``db.retention`` over a seeded ledger of ``--rows`` generations (half past the 90-day policy)
   while a producer process submits jobs one at a time throughout: rows deleted per second, the
   longest submit (the longest stall a producer process saw), batches and the largest batch, and the
   archive checked by reading it back (row count, ids, sha256).
2. ``cache.expire`` over ``--keys`` keys under the system's prefix, 10% without a TTL, all idle
   past a short policy: the pipelined SCAN + TTL + OBJECT IDLETIME pass against a one-key-at-a-time
   loop (TTL, then OBJECT IDLETIME and DEL per key), as a ratio.

Prints a table and one final line ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def bench_retention(database_url: str, redis_url: str, rows: int, archive_dir: Path, batch: int) -> dict[str, Any]:
    from sqlalchemy import func, select
    from throughput import MODEL_ROOT, ensure_model

    from textnlp_jobs.client import Client
    from textnlp_jobs.db.migrate import upgrade
    from textnlp_jobs.db.models import Generation
    from textnlp_jobs.db.session import get_engine, session_factory
    from textnlp_jobs.inference import store
    from textnlp_jobs.local_stack import ProducerProcess, seed_generations
    from textnlp_jobs.maintenance import archive
    from textnlp_jobs.maintenance.runner import run_maintenance
    from textnlp_jobs.settings import Settings

    upgrade(database_url)
    _version, path = ensure_model("tiny")
    settings = Settings(database_url=database_url, broker_url=redis_url, model_store=MODEL_ROOT,
                        archive_dir=archive_dir, retention_batch=batch, home=archive_dir.parent)
    with session_factory(settings).begin() as session:
        store.register_version(session, "tiny", path)
    say(f"seeding {rows:,} generations over 180 days")
    started = time.perf_counter()
    seed_generations(settings, rows)
    say(f"seeded in {time.perf_counter() - started:.1f}s")
    cutoff = datetime.now(UTC) - timedelta(days=90)
    with get_engine(settings).connect() as connection:
        expected = {str(i) for i in connection.execute(select(Generation.id).where(
            Generation.created_at < cutoff, Generation.status.notin_(["queued", "running"]))).scalars()}
        live_old = connection.execute(select(func.count()).where(
            Generation.created_at < cutoff, Generation.status.in_(["queued", "running"]))).scalar_one()

    client = Client(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTNLP_")}
    env.update({"TEXTNLP_DATABASE_URL": database_url, "TEXTNLP_BROKER_URL": redis_url,
                "TEXTNLP_MODEL_STORE": str(MODEL_ROOT), "TEXTNLP_HOME": str(archive_dir.parent),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    producer = ProducerProcess(env, archive_dir.parent / "producer", model="tiny")
    say(f"db.retention over {len(expected):,} expired rows, batches of {batch:,}, a producer process submitting")
    started = time.perf_counter()
    result = run_maintenance("db.retention", settings=settings, celery=client.celery)
    seconds = time.perf_counter() - started
    latencies = producer.stop()

    say("verifying the archive by reading it back")
    archived: set[str] = set()
    for entry in result["archives"]:
        manifest = archive.verify(Path(entry["path"]))
        assert manifest.sha256 == entry["sha256"]
        archived.update(r["id"] for r in archive.read_rows(Path(entry["path"])))
    with get_engine(settings).connect() as connection:
        left_expired = connection.execute(select(func.count()).where(
            Generation.created_at < cutoff, Generation.status.notin_(["queued", "running"]))).scalar_one()
        live_old_after = connection.execute(select(func.count()).where(
            Generation.created_at < cutoff, Generation.status.in_(["queued", "running"]))).scalar_one()
    deleted = result["deleted"]["generations"]
    return {
        "rows": rows, "expired": len(expected), "deleted_generations": deleted, "deleted": result["deleted"],
        "seconds": round(seconds, 2), "generations_per_second": round(deleted / seconds, 1),
        "rows_per_second_all_tables": round(sum(result["deleted"].values()) / seconds, 1),
        "archive_files": len(result["archives"]), "archive_bytes": sum(Path(e["path"]).stat().st_size
                                                                       for e in result["archives"]),
        "archive_matches": archived == expected, "expired_left": left_expired,
        "queued_running_untouched": live_old_after == live_old, "batches": result["batches"],
        "largest_batch": result["largest_batch"], "batch_limit": batch, "lock_timeouts": result["lock_timeouts"],
        "submits_during": len(latencies), "longest_submit_ms": round(max(latencies) * 1000, 1),
        "p99_submit_ms": round(sorted(latencies)[int(len(latencies) * 0.99)] * 1000, 1),
        "median_submit_ms": round(sorted(latencies)[len(latencies) // 2] * 1000, 1),
    }


def fill_keys(client: Any, count: int, only_missing_ttl: bool = False) -> None:
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            if i % 10 == 0:
                pipe.set(f"textnlp:cache:bench:{i}", "v")
            elif not only_missing_ttl:
                pipe.set(f"textnlp:cache:bench:{i}", "v", ex=3600)
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()


def one_key_at_a_time(client: Any, idle_seconds: int) -> dict[str, int]:
    """The baseline: SCAN, then TTL per key and, for a key with none, OBJECT IDLETIME and DEL."""
    counts = {"scanned": 0, "removed": 0}
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match="textnlp:*", count=1000)
        for key in keys:
            counts["scanned"] += 1
            if client.ttl(key) == -1 and (client.object("idletime", key) or 0) > idle_seconds:
                counts["removed"] += client.delete(key)
        if cursor == 0:
            return counts


def bench_cache(redis_url: str, keys: int, idle: int, baseline: bool) -> dict[str, Any]:
    import redis

    from textnlp_jobs.maintenance.cache import idle_keys_without_ttl

    client = redis.Redis.from_url(redis_url)
    say(f"creating {keys:,} keys (10% without a TTL), waiting {idle + 2}s so they are idle")
    fill_keys(client, keys)
    time.sleep(idle + 2)
    started = time.perf_counter()
    pipelined = idle_keys_without_ttl(client, idle)
    pipelined_s = time.perf_counter() - started
    say(f"pipelined: {pipelined} in {pipelined_s:.2f}s")
    out: dict[str, Any] = {"keys": keys, "idle_policy_s": idle, "pipelined_s": round(pipelined_s, 2),
                           "pipelined_removed": pipelined["removed"], "exact": pipelined["removed"] == keys // 10}
    if baseline:
        fill_keys(client, keys, only_missing_ttl=True)
        time.sleep(idle + 2)
        say("one key at a time (TTL, OBJECT IDLETIME, DEL per key)")
        started = time.perf_counter()
        loop = one_key_at_a_time(client, idle)
        loop_s = time.perf_counter() - started
        out.update({"one_at_a_time_s": round(loop_s, 2), "one_at_a_time_removed": loop["removed"],
                    "speedup": round(loop_s / pipelined_s, 1)})
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--idle", type=int, default=5, help="cache idle policy in seconds")
    parser.add_argument("--skip-baseline", action="store_true", help="no one-key-at-a-time loop")
    parser.add_argument("--skip-retention", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args()

    import tempfile

    from textnlp_jobs import local_stack

    report: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                              "when": datetime.now(UTC).isoformat(timespec="seconds")}
    with ExitStack() as stack:
        database_url = stack.enter_context(local_stack.scratch_postgres())
        redis_url = stack.enter_context(local_stack.scratch_redis())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-maintenance-")))
        if not args.skip_retention:
            report["retention"] = bench_retention(database_url, redis_url, args.rows, work / "archive", args.batch)
        if not args.skip_cache:
            import redis

            redis.Redis.from_url(redis_url).flushdb()
            local_stack.keep_ownership(redis_url)
            report["cache_expire"] = bench_cache(redis_url, args.keys, args.idle, not args.skip_baseline)

    print()
    if "retention" in report:
        r = report["retention"]
        print(f"db.retention  {r['deleted_generations']:,} of {r['rows']:,} generations archived+deleted in "
              f"{r['seconds']}s = {r['generations_per_second']:,} rows/s ({r['rows_per_second_all_tables']:,} "
              f"rows/s all tables); {r['batches']} batches, largest {r['largest_batch']} (limit {r['batch_limit']}); "
              f"archive {r['archive_files']} files, matches: {r['archive_matches']}; expired left: "
              f"{r['expired_left']}; queued/running untouched: {r['queued_running_untouched']}")
        print(f"producer      {r['submits_during']} submits during the run, longest {r['longest_submit_ms']} ms, "
              f"p99 {r['p99_submit_ms']} ms, median {r['median_submit_ms']} ms")
    if "cache_expire" in report:
        c = report["cache_expire"]
        line = f"cache.expire  {c['keys']:,} keys: pipelined {c['pipelined_s']}s (removed {c['pipelined_removed']:,})"
        if "speedup" in c:
            line += f"; one key at a time {c['one_at_a_time_s']}s; ratio {c['speedup']}x"
        print(line)
    print("BENCH_RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
