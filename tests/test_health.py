"""health.check against the real thing: a Redis we stop and start again, a device worker we kill
and restart, and the embedded default with no servers at all."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from textnlp_jobs.celery_app import create_app
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.maintenance.health import Component, HealthReport, check_health
from textnlp_jobs.maintenance.runner import run_maintenance
from textnlp_jobs.settings import Settings
from workers.device import worker_hostname

from .ops_services import Service, scratch_redis_server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def check(settings: Settings) -> HealthReport:
    celery = create_app(settings)
    try:
        return check_health(settings, session_factory(settings), celery)
    finally:
        celery.close()


def not_ok(report: HealthReport) -> list[tuple[str, str, str]]:
    return [(c.name, c.status, c.detail) for c in report.components if c.status != "ok"]


def component(report: HealthReport, name: str) -> Component:
    (found,) = [c for c in report.components if c.name == name]
    return found


def redis_answers(service: Service) -> bool:
    try:
        return bool(redis.Redis(port=service.port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


def health_cli(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    done = subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", "health", "--json"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, json.loads(done.stdout)


def test_health_reports_a_stopped_redis_down_and_ok_again_once_it_is_back(stack: LocalStack, tmp_path: Path) -> None:
    server = scratch_redis_server(tmp_path).start()
    try:
        wait_for(lambda: redis_answers(server), 30, "the scratch Redis answers")
        broker = f"redis://127.0.0.1:{server.port}/0"
        settings = stack.settings(broker_url=broker, health_ping_timeout_seconds=0.5)
        before = check(settings)
        assert component(before, "broker").status == "ok" and before.status == "ok", not_ok(before)

        server.stop()
        during = check(settings)
        assert component(during, "broker").status == "down" and during.status == "down", not_ok(during)
        assert component(during, "database").status == "ok"
        code, printed = health_cli(stack.process_env({"TEXTNLP_BROKER_URL": broker,
                                                      "TEXTNLP_HEALTH_PING_TIMEOUT_SECONDS": "0.5"}))
        assert code == 1 and printed["status"] == "down"

        server.start()
        wait_for(lambda: redis_answers(server), 30, "the scratch Redis is back")
        after = check(settings)
        assert component(after, "broker").status == "ok" and after.status == "ok", not_ok(after)
    finally:
        server.stop()


def test_health_reports_a_killed_device_worker_down_and_ok_again_after_its_restart(stack: LocalStack) -> None:
    settings = stack.settings(health_ping_timeout_seconds=1.0)
    hostname = worker_hostname(settings, "cpu.0")
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(hostname)
    before = check(settings)
    assert component(before, "worker testnode/cpu.0").status == "ok", not_ok(before)
    assert component(before, "worker testnode/cpu.0").value == "demo"  # the models it serves
    assert "1 consumer(s)" in component(before, "queue textnlp.gen.demo").detail
    # The maintenance worker's placement need not name what the device workers serve: a queue a
    # live worker consumes is reported (and its gauges set) all the same.
    elsewhere = check(stack.settings(health_ping_timeout_seconds=1.0, placement={"*": ["other"]}))
    assert "1 consumer(s)" in component(elsewhere, "queue textnlp.gen.demo").detail

    worker.kill()
    during = check(settings)
    assert component(during, "worker testnode/cpu.0").status == "down", not_ok(during)
    assert during.status == "down"
    run = run_maintenance("health.check", settings=settings)  # the scheduled task says the same
    assert run["status"] == "succeeded" and run["health"] == "down"
    assert {"name": "worker testnode/cpu.0", "status": "down"}.items() <= next(
        c for c in run["components"] if c["name"] == "worker testnode/cpu.0").items()

    worker.start()
    stack.wait_ready(hostname)
    after = check(settings)
    assert component(after, "worker testnode/cpu.0").status == "ok" and after.status == "ok", not_ok(after)

    worker.stop()  # a clean stop: the device is no longer expected
    time.sleep(0.5)
    assert not [c for c in check(settings).components if c.name.startswith("worker ")]


def test_health_on_the_embedded_default_is_ok_with_no_servers(embedded_stack: LocalStack) -> None:
    code, printed = health_cli(embedded_stack.process_env())
    assert code == 0 and printed["status"] == "ok", printed
    names = {c["name"] for c in printed["components"]}  # type: ignore[attr-defined]
    assert {"database", "broker", "pushgateway", "disk home", "disk model_store", "queue textnlp.gen.demo"} <= names
