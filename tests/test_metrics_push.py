"""Workers push their metrics to a real pushgateway: the job metrics arrive with bounded labels, a
clean shutdown deletes the worker's group, metrics.expire_groups removes a SIGKILLed worker's group,
and a pushgateway outage neither fails a job nor floods the log."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from textnlp_jobs.client import Client
from textnlp_jobs.local_stack import LocalStack, WorkerProcess
from textnlp_jobs.maintenance.runner import run_maintenance
from textnlp_jobs.metrics.expire import list_groups
from textnlp_jobs.metrics.push import DEVICE_WORKER_JOB, ONESHOT_JOB, Pusher
from workers.device import worker_hostname

from .helpers import job_specs
from .ops_services import Service, free_port, pushgateway, scrape, value, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTANCE = "testnode:cpu.0"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Service]:
    service = pushgateway(tmp_path).start()
    yield service
    service.stop()


def pushing_worker(stack: LocalStack, gateway_url: str, **extra_env: str) -> WorkerProcess:
    return stack.device_worker("cpu.0", extra_env={
        "TEXTNLP_PUSHGATEWAY_URL": gateway_url, "TEXTNLP_PUSH_INTERVAL_SECONDS": "0.5",
        "TEXTNLP_PUSH_TIMEOUT_SECONDS": "1", **extra_env,
    })


def run_jobs(stack: LocalStack, count: int) -> list[uuid.UUID]:
    client = Client(stack.settings())
    jobs = client.submit_many(job_specs(count))
    done = client.wait([j.id for j in jobs], timeout=180)
    assert [j.status for j in done] == ["succeeded"] * count, stack.workers[-1].log_tail()
    return [j.id for j in jobs]


def worker_groups(gateway_url: str) -> list[dict[str, str]]:
    return [g.labels for g in list_groups(gateway_url, 5) if g.job == DEVICE_WORKER_JOB]


def test_a_device_worker_pushes_its_job_metrics_and_deletes_its_group_on_a_clean_shutdown(
        stack: LocalStack, gateway: Service) -> None:
    worker = pushing_worker(stack, gateway.url).start()
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    ids = run_jobs(stack, 6)
    group = {"job": DEVICE_WORKER_JOB, "instance": INSTANCE}

    def six_pushed() -> bool:
        return value(scrape(gateway.url + "/metrics"), "textnlp_jobs_finished_total", model_name="demo",
                     status="succeeded", **group) == 6
    wait_for(six_pushed, 30, "the worker pushed its six successes")
    samples = scrape(gateway.url + "/metrics")
    assert value(samples, "textnlp_worker_up", device="cpu.0", **group) == 1
    assert value(samples, "textnlp_worker_last_batch_timestamp_seconds", device="cpu.0", **group)
    assert value(samples, "textnlp_job_queue_wait_seconds_count", model_name="demo", **group) == 6
    assert value(samples, "textnlp_job_latency_seconds_count", model_name="demo", **group) == 6
    # The device loop's own accounting comes from the engine process, relayed by the worker: each
    # job was admitted once (a start or a join, or a static batch), and the loop was busy a while.
    def admitted() -> float:
        samples = scrape(gateway.url + "/metrics")
        return sum(value(samples, "textnlp_device_loop_rows_total", model_name="demo", phase=phase, **group) or 0
                   for phase in ("start", "join", "batch"))
    wait_for(lambda: admitted() == 6, 30, "the engine's device-loop metrics counted six admissions")
    samples = scrape(gateway.url + "/metrics")
    # Batch sizes are the engine's too: read once its relayed snapshot has caught up (above).
    batches = value(samples, "textnlp_batch_size_count", model_name="demo", **group)
    assert batches and 1 <= batches <= 6
    assert value(samples, "textnlp_batch_size_sum", model_name="demo", **group) == 6
    assert (value(samples, "textnlp_device_loop_seconds_total", model_name="demo", **group) or 0) > 0
    (duration,) = {tuple(sorted(s.labels)) for s in samples
                   if s.name == "textnlp_model_inference_duration_seconds_count"}
    assert duration == ("input_length_bucket", "instance", "job", "model_name", "model_version")
    # Bounded labels: no job id, no prompt anywhere in what the pushgateway serves.
    label_values = {v for s in samples for v in s.labels.values()}
    assert not label_values & {str(i) for i in ids}
    assert not any("Return a new list" in v for v in label_values)

    worker.stop()
    assert worker.process is not None and worker.process.returncode == 0
    assert worker_groups(gateway.url) == []
    assert "pushgateway_group_deleted" in worker.log_tail(200)


def test_metrics_expire_groups_removes_the_group_of_a_sigkilled_worker_and_keeps_live_ones(
        stack: LocalStack, gateway: Service) -> None:
    worker = pushing_worker(stack, gateway.url).start()
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    wait_for(lambda: worker_groups(gateway.url), 30, "the worker's first push")
    worker.kill()
    killed = time.monotonic()
    assert worker_groups(gateway.url) == [{"job": DEVICE_WORKER_JOB, "instance": INSTANCE}]

    # A maintenance task run by hand (one-shot, as `textnlp-jobs maintenance run` does) pushes its
    # own group when it finishes.
    settings = stack.settings(pushgateway_url=gateway.url, pushgateway_group_ttl_seconds=3.0)
    assert run_maintenance("health.check", settings=settings)["status"] == "succeeded"
    oneshot = {"job": ONESHOT_JOB, "instance": "testnode:health.check"}
    samples = scrape(gateway.url + "/metrics")
    # (the registry is this test process's: other tests may have run health.check before)
    assert (value(samples, "textnlp_maintenance_runs_total", task="health.check", status="succeeded", **oneshot)
            or 0) >= 1
    assert value(samples, "textnlp_maintenance_last_success_timestamp_seconds", task="health.check", **oneshot)

    # Ours has been silent for longer than the TTL; a live worker elsewhere pushed just now.
    time.sleep(max(0.0, killed + 3.5 - time.monotonic()))
    registry = CollectorRegistry()
    Gauge("textnlp_worker_up", "up", ["device"], registry=registry).labels("cuda.3").set(1)
    other = Pusher(gateway.url, DEVICE_WORKER_JOB, "other:cuda.3", interval=1, timeout=2, registry=registry)
    assert other.push()
    dry = run_maintenance("metrics.expire_groups", settings=settings, dry_run=True)
    assert [g["instance"] for g in dry["expired"]] == [INSTANCE]
    assert len(worker_groups(gateway.url)) == 2  # a dry run changes nothing
    assert other.push()
    report = run_maintenance("metrics.expire_groups", settings=settings)
    assert report["status"] == "succeeded" and [g["instance"] for g in report["expired"]] == [INSTANCE]
    assert worker_groups(gateway.url) == [{"job": DEVICE_WORKER_JOB, "instance": "other:cuda.3"}]
    assert sorted(g.labels["instance"] for g in list_groups(gateway.url, 5) if g.job == ONESHOT_JOB) == [
        "testnode:health.check", "testnode:metrics.expire_groups"]


def test_with_the_pushgateway_down_jobs_keep_succeeding_and_the_outage_is_logged_once(
        stack: LocalStack, gateway: Service) -> None:
    port = free_port()  # and the worker serves /metrics for pull all along
    worker = pushing_worker(stack, gateway.url, TEXTNLP_METRICS_PORT=str(port)).start()
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    run_jobs(stack, 4)
    wait_for(lambda: worker_groups(gateway.url), 30, "the worker's first push")
    gateway.stop()
    run_jobs(stack, 8)
    time.sleep(3)  # six push intervals with the gateway down
    log = worker.log_tail(2000)
    assert log.count("pushgateway_unreachable") == 1, log
    pulled = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(pulled, "textnlp_jobs_finished_total", model_name="demo", status="succeeded") == 12

    gateway.start()  # the same port: the worker's next tick finds it
    wait_for(lambda: worker_groups(gateway.url), 30, "pushing resumed on the next tick")
    wait_for(lambda: "pushgateway_reachable_again" in worker.log_tail(2000), 10, "the recovery is logged")
    assert value(scrape(gateway.url + "/metrics"), "textnlp_jobs_finished_total", status="succeeded") == 12
