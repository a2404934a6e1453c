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
