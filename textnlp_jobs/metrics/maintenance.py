"""Metrics of maintenance runs: how often each task ran, how it ended, how long it took, and when
it last succeeded (the alert rules watch that timestamp for a task that stopped succeeding)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from textnlp_jobs.metrics.registry import REGISTRY

MAINTENANCE_RUNS = Counter(
    "textnlp_maintenance_runs_total", "Maintenance runs by task and how they ended "
    "(succeeded, failed, skipped, locked).", ["task", "status"], registry=REGISTRY,
)
MAINTENANCE_DURATION = Histogram(
    "textnlp_maintenance_duration_seconds", "Wall time of one maintenance run.", ["task"],
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400), registry=REGISTRY,
)
MAINTENANCE_LAST_SUCCESS = Gauge(
    "textnlp_maintenance_last_success_timestamp_seconds", "Unix time of the task's last successful run.",
    ["task"], registry=REGISTRY,
)


def record_maintenance_run(task_name: str, status: str, duration_s: float) -> None:
    """Record one finished (or refused) run. Called by the runner at the end of every run."""
    MAINTENANCE_RUNS.labels(task_name, status).inc()
    if status != "locked":
        MAINTENANCE_DURATION.labels(task_name).observe(duration_s)
    if status == "succeeded":
        MAINTENANCE_LAST_SUCCESS.labels(task_name).set(time.time())


DB_TABLE_BYTES = Gauge(
    "textnlp_db_table_size_bytes", "Size of a hot ledger table with its indexes, at the last db.vacuum.",
    ["table"], registry=REGISTRY,
)
DB_DEAD_TUPLES = Gauge(
    "textnlp_db_dead_tuples", "Dead tuples of a hot ledger table before the last db.vacuum.", ["table"],
    registry=REGISTRY,
)
DB_BLOAT_RATIO = Gauge(
    "textnlp_db_bloat_ratio", "Estimated reclaimable share of a hot ledger table (0..1), at the last db.vacuum.",
    ["table"], registry=REGISTRY,
)


def record_table_report(table: str, size_bytes: int, dead_tuples: int | None, bloat_ratio: float) -> None:
    """Export one table's line of the db.vacuum bloat report."""
    DB_TABLE_BYTES.labels(table).set(size_bytes)
    if dead_tuples is not None:
        DB_DEAD_TUPLES.labels(table).set(dead_tuples)
    DB_BLOAT_RATIO.labels(table).set(bloat_ratio)
