"""The process's metrics, defined once in one registry (pushed to the pushgateway by workers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

INFERENCE_DURATION = Histogram(
    "textnlp_model_inference_duration_seconds", "Time of one batched generate call.",
    ["model_name", "model_version", "input_length_bucket"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
TOKENS_PER_SECOND = Gauge(
    "textnlp_model_tokens_per_second", "New tokens per second of the last batch.",
    ["model_name", "model_version"], registry=REGISTRY,
)
MODEL_ERRORS = Counter(
    "textnlp_model_errors_total", "Jobs that failed in the model, by error code.",
    ["model_name", "error_type"], registry=REGISTRY,
)
MEMORY_USAGE = Gauge(
    "textnlp_model_memory_usage_bytes", "Device and process memory of the worker.",
    ["memory_type"], registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "textnlp_batch_size", "Jobs per batched generate call.", ["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "textnlp_job_queue_wait_seconds", "From submission to the start of the job's batch.", ["model_name"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "textnlp_jobs_submitted_total", "Jobs accepted by producers.", ["model_name"], registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "textnlp_jobs_finished_total", "Jobs that reached a final status on a worker.", ["model_name", "status"],
    registry=REGISTRY,
)
JOBS_DROPPED = Counter(
    "textnlp_jobs_dropped_total", "Jobs dropped before generation (cancelled, overdue, duplicate).",
    ["model_name", "reason"], registry=REGISTRY,
)
RECONCILED = Counter(
    "textnlp_reconciler_actions_total", "Rows the reconciler acted on.", ["action"], registry=REGISTRY,
)

JOB_LATENCY = Histogram(
    "textnlp_job_latency_seconds", "From submission to the result written (end to end).", ["model_name"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)

# --- workers: one series per device, so an operator sees each GPU -----------------------------
WORKER_UP = Gauge(
    "textnlp_worker_up", "1 while this device worker runs (its group is deleted on a clean shutdown).",
    ["device"], registry=REGISTRY,
)
WORKER_LAST_BATCH = Gauge(
    "textnlp_worker_last_batch_timestamp_seconds", "Unix time of the device's last finished batch.",
    ["device"], registry=REGISTRY,
)
# Where a device's loop spends its time. phase: "step" (one decode step of a running batch), "join"
# (newcomers prefilled beside running rows), "start" (prefill of an empty batch), "batch" (one
# static generate call). rate(seconds) summed over phases is the fraction of time the device is busy;
# seconds / operations the time of one; rows / operations the rows each one carried.
DEVICE_LOOP_SECONDS = Counter(
    "textnlp_device_loop_seconds", "Time the device loop spent, by phase.", ["model_name", "phase"],
    registry=REGISTRY,
)
DEVICE_LOOP_OPERATIONS = Counter(
    "textnlp_device_loop_operations", "Steps, joins, starts and static batches of the device loop.",
    ["model_name", "phase"], registry=REGISTRY,
)
DEVICE_LOOP_ROWS = Counter(
    "textnlp_device_loop_rows", "Rows carried: running rows of each step, newcomers of each join or start.",
    ["model_name", "phase"], registry=REGISTRY,
)
DEVICE_MEMORY_TOTAL = Gauge(
    "textnlp_device_memory_total_bytes", "Total memory of the worker's GPU.", ["device"], registry=REGISTRY,
)

# --- what health.check measures (pushed by the maintenance worker) ----------------------------
LEDGER_JOBS = Gauge(
    "textnlp_ledger_jobs", "Jobs in the ledger by model and status.", ["model_name", "status"], registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "textnlp_queue_depth", "Messages waiting in a broker queue (all priority levels).", ["queue"],
    registry=REGISTRY,
)
QUEUE_OLDEST_AGE = Gauge(
    "textnlp_queue_oldest_job_age_seconds", "Age of the oldest queued job of a queue (0 when none).", ["queue"],
    registry=REGISTRY,
)
QUEUE_CONSUMERS = Gauge(
    "textnlp_queue_consumers", "Live workers consuming a queue (from Celery inspect).", ["queue"],
    registry=REGISTRY,
)
WORKERS_ALIVE = Gauge(
    "textnlp_workers_alive", "Known device workers that answered the last health ping.", registry=REGISTRY,
)
HEALTH_STATUS = Gauge(
    "textnlp_health_status", "Last health.check result per component: 0 ok, 1 degraded, 2 down.", ["component"],
    registry=REGISTRY,
)
HEALTH_LAST_RUN = Gauge(
    "textnlp_health_last_run_timestamp_seconds", "Unix time of the last health.check.", registry=REGISTRY,
)
DISK_FREE = Gauge(
    "textnlp_disk_free_bytes", "Free bytes on the filesystem of a volume the system writes to.", ["volume"],
    registry=REGISTRY,
)
DISK_SIZE = Gauge(
    "textnlp_disk_size_bytes", "Size of the filesystem of a volume the system writes to.", ["volume"],
    registry=REGISTRY,
)
REDIS_MEMORY = Gauge(
    "textnlp_redis_memory_used_bytes", "Memory Redis reports in use (INFO memory used_memory).", registry=REGISTRY,
)
MAINTENANCE_PERIOD = Gauge(
    "textnlp_maintenance_period_seconds", "How often a maintenance task is scheduled (alerts use twice this).",
    ["task"], registry=REGISTRY,
)
RETENTION_ROWS = Counter(
    "textnlp_retention_rows_total", "Rows db.retention archived or deleted, by table.", ["table", "action"],
    registry=REGISTRY,
)
PUSHGATEWAY_GROUPS_EXPIRED = Counter(
    "textnlp_pushgateway_groups_expired_total", "Pushgateway groups of silent workers deleted.", registry=REGISTRY,
)


def input_length_bucket(tokens: int) -> str:
    """A coarse label for prompt length, so label cardinality stays small."""
    for limit in (32, 128, 512, 2048):
        if tokens <= limit:
            return f"le_{limit}"
    return "gt_2048"


def record_memory(torch_device: str) -> None:
    """Sample device and process memory into ``textnlp_model_memory_usage_bytes``."""
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    MEMORY_USAGE.labels("cpu_max_rss").set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if torch_device.startswith("cuda"):
        import torch

        MEMORY_USAGE.labels("gpu_allocated").set(torch.cuda.memory_allocated())
        MEMORY_USAGE.labels("gpu_reserved").set(torch.cuda.memory_reserved())
        MEMORY_USAGE.labels("gpu_max_allocated").set(torch.cuda.max_memory_allocated())
        if _device is not None:
            DEVICE_MEMORY_TOTAL.labels(_device).set(torch.cuda.get_device_properties(0).total_memory)


_device: str | None = None


def worker_started(device: str) -> None:
    """Mark this process as the worker of ``device``: ``textnlp_worker_up`` and batch times follow it."""
    global _device
    _device = device
    WORKER_UP.labels(device).set(1)


def device_loop(model: str, phase: str, seconds: float, rows: int) -> None:
    """Account one operation of a device's loop (see ``DEVICE_LOOP_SECONDS``)."""
    DEVICE_LOOP_SECONDS.labels(model, phase).inc(seconds)
    DEVICE_LOOP_OPERATIONS.labels(model, phase).inc()
    DEVICE_LOOP_ROWS.labels(model, phase).inc(rows)


def batch_finished() -> None:
    """Record the time of the device's last finished batch (a worker that stops batching shows)."""
    if _device is not None:
        WORKER_LAST_BATCH.labels(_device).set_to_current_time()
