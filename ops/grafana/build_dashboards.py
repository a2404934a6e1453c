"""Writes the four Grafana dashboards of ops/grafana/dashboards/ (run it after changing a panel):

    python ops/grafana/build_dashboards.py

Panels are declared as (title, unit, queries) so a dashboard reads as a list of questions an operator
asks; the JSON is Grafana's dashboard model (schemaVersion 39, timeseries/stat panels). Every query
names only metrics the code defines: tests/test_ops_config.py checks it, and that every panel uses
the provisioned datasource.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "textnlp-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"


@dataclass
class Panel:
    title: str
    unit: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    panels: list[Panel] = field(default_factory=list)


def render(dashboard: Dashboard) -> dict[str, object]:
    panels = []
    for number, panel in enumerate(dashboard.panels):
        panels.append({
            "id": number + 1,
            "type": panel.kind,
            "title": panel.title,
            "description": panel.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (number % 2), "y": 8 * (number // 2)},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(panel.queries)
            ],
        })
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "tags": ["textnlp-jobs"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }


def quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[5m])))", f"p{int(q * 100)} {{{{{by}}}}}")
            for q in (0.5, 0.95)]


JOBS = Dashboard("textnlp-jobs-queues", "textnlp-jobs: jobs and queues", [
    Panel("Jobs finished per second, by model and status", "ops",
          [("sum by (model_name, status) (rate(textnlp_jobs_finished_total[5m]))", "{{model_name}} {{status}}")]),
    Panel("Jobs in the ledger, by status", "short",
          [("sum by (status) (max by (model_name, status) (textnlp_ledger_jobs))", "{{status}}")]),
    Panel("Queue depth", "short", [("max by (queue) (textnlp_queue_depth)", "{{queue}}")]),
    Panel("Oldest queued job", "s", [("max by (queue) (textnlp_queue_oldest_job_age_seconds)", "{{queue}}")]),
    Panel("Queue wait (submission to batch start)", "s", quantiles("textnlp_job_queue_wait_seconds", "model_name")),
    Panel("End-to-end latency (submission to result)", "s", quantiles("textnlp_job_latency_seconds", "model_name")),
    Panel("Workers consuming each model queue", "short",
          [("max by (queue) (textnlp_queue_consumers)", "{{queue}}")]),
    Panel("Jobs submitted and dropped per second", "ops", [
        ("sum by (model_name) (rate(textnlp_jobs_submitted_total[5m]))", "submitted {{model_name}}"),
        ("sum by (model_name, reason) (rate(textnlp_jobs_dropped_total[5m]))", "dropped {{model_name}} {{reason}}"),
    ]),
    Panel("Reconciler actions per hour", "short",
          [("sum by (action) (increase(textnlp_reconciler_actions_total[1h]))", "{{action}}")]),
])

MODELS = Dashboard("textnlp-model-performance", "textnlp-jobs: model performance", [
    Panel("Tokens per second (last batch), by device", "short",
          [("max by (model_name, instance) (textnlp_model_tokens_per_second)", "{{model_name}} {{instance}}")]),
    Panel("Batched generate time", "s", quantiles("textnlp_model_inference_duration_seconds", "model_name")),
    Panel("Mean batch size", "short", [(
        "sum by (model_name) (rate(textnlp_batch_size_sum[5m]))"
        " / sum by (model_name) (rate(textnlp_batch_size_count[5m]))",
        "{{model_name}}")]),
    Panel("GPU memory per device", "bytes", [
        ('max by (instance, memory_type) (textnlp_model_memory_usage_bytes{memory_type=~"gpu_.*"})',
         "{{instance}} {{memory_type}}"),
        ("max by (instance) (textnlp_device_memory_total_bytes)", "{{instance}} total"),
    ]),
    Panel("Model errors per second, by code", "ops",
          [("sum by (model_name, error_type) (rate(textnlp_model_errors_total[5m]))",
            "{{model_name}} {{error_type}}")]),
    Panel("Device busy (fraction of time in decode steps, joins and batches)", "percentunit", [(
        "sum by (model_name, instance, phase) (rate(textnlp_device_loop_seconds_total[5m]))",
        "{{model_name}} {{instance}} {{phase}}")]),
    Panel("Time of one decode step or join, and rows per step", "s", [
        ("sum by (model_name, phase) (rate(textnlp_device_loop_seconds_total[5m]))"
         " / sum by (model_name, phase) (rate(textnlp_device_loop_operations_total[5m]))", "{{model_name}} {{phase}}"),
    ]),
    Panel("Rows per decode step (running batch) and per join", "short", [
        ("sum by (model_name, phase) (rate(textnlp_device_loop_rows_total[5m]))"
         " / sum by (model_name, phase) (rate(textnlp_device_loop_operations_total[5m]))", "{{model_name}} {{phase}}"),
    ]),
    Panel("Generate time by prompt length", "s", [(
        "histogram_quantile(0.95, sum by (input_length_bucket, le) "
        "(rate(textnlp_model_inference_duration_seconds_bucket[5m])))", "p95 {{input_length_bucket}}")]),
])

MAINTENANCE = Dashboard("textnlp-maintenance", "textnlp-jobs: maintenance", [
    Panel("Since the last success, per task", "s",
          [("time() - max by (task) (textnlp_maintenance_last_success_timestamp_seconds)", "{{task}}")],
          kind="stat"),
    Panel("Runs per hour, by task and status", "short",
          [("sum by (task, status) (increase(textnlp_maintenance_runs_total[1h]))", "{{task}} {{status}}")]),
    Panel("Run duration, by task", "s", [
        ("max by (task) (rate(textnlp_maintenance_duration_seconds_sum[1d]) "
         "/ rate(textnlp_maintenance_duration_seconds_count[1d]))", "mean {{task}}"),
        ("histogram_quantile(0.95, sum by (task, le) (rate(textnlp_maintenance_duration_seconds_bucket[1d])))",
         "p95 {{task}}"),
    ]),
    Panel("Rows archived and deleted by db.retention, per day", "short",
          [("sum by (table, action) (increase(textnlp_retention_rows_total[1d]))", "{{action}} {{table}}")]),
    Panel("Redis memory", "bytes", [("max(textnlp_redis_memory_used_bytes)", "used")]),
    Panel("Ledger table sizes", "bytes", [("max by (table) (textnlp_db_table_size_bytes)", "{{table}}")]),
    Panel("Dead tuples per table", "short", [("max by (table) (textnlp_db_dead_tuples)", "{{table}}")]),
    Panel("Pushgateway groups of silent workers deleted", "short",
          [("sum(increase(textnlp_pushgateway_groups_expired_total[1h]))", "per hour")]),
])

WORKERS = Dashboard("textnlp-workers", "textnlp-jobs: workers", [
    Panel("Device workers up", "short", [("max by (instance, device) (textnlp_worker_up)", "{{instance}}")],
          kind="stat"),
    Panel("Since each device's last batch", "s",
          [("time() - max by (instance) (textnlp_worker_last_batch_timestamp_seconds)", "{{instance}}")]),
    Panel("Since each worker's last push", "s", [(
        'time() - max by (job, instance) (push_time_seconds{job=~"textnlp_device_worker|textnlp_maintenance_worker"})',
        "{{job}} {{instance}}")]),
    Panel("Known device workers answering a ping", "short", [("max(textnlp_workers_alive)", "alive")], kind="stat"),
    Panel("health.check per component (0 ok, 1 degraded, 2 down)", "short",
          [("max by (component) (textnlp_health_status)", "{{component}}")]),
    Panel("Disk free", "percentunit",
          [("max by (volume) (textnlp_disk_free_bytes / textnlp_disk_size_bytes)", "{{volume}}")]),
    Panel("Worker process peak memory", "bytes", [(
        'max by (instance) (textnlp_model_memory_usage_bytes{memory_type="cpu_max_rss"})', "{{instance}}")]),
    Panel("Celery workers online (Flower)", "short", [("sum(flower_worker_online)", "online")], kind="stat"),
])

DASHBOARDS = {"jobs-and-queues": JOBS, "model-performance": MODELS, "maintenance": MAINTENANCE, "workers": WORKERS}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, dashboard in DASHBOARDS.items():
        (OUT / f"{name}.json").write_text(json.dumps(render(dashboard), indent=2) + "\n")


if __name__ == "__main__":
    main()
