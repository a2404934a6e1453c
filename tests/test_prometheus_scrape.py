"""The committed prometheus.yml, run by a real Prometheus: it scrapes a real pushgateway with
honor_labels (a worker's series keep its job and instance), real Flower's /metrics (no credentials
needed there, while Flower's pages need them) and itself, and loads every alert rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge

from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.metrics.push import DEVICE_WORKER_JOB, Pusher

from .ops_services import Service, free_port, need, pushgateway, wait_for, wait_for_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return list(json.load(response)["data"]["result"])


def prometheus_config(tmp_path: Path, targets: dict[str, str]) -> Path:
    """ops/prometheus as committed, pointed at this test's processes and scraping every second."""
    config = yaml.safe_load((REPO_ROOT / "ops/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [targets[t] for t in static["targets"]]
    folder = tmp_path / "prometheus"
    (folder / "rules").mkdir(parents=True)
    for rules in (REPO_ROOT / "ops/prometheus/rules").glob("*.yml"):
        (folder / "rules" / rules.name).write_text(rules.read_text())
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    return folder / "prometheus.yml"


def test_prometheus_scrapes_the_pushgateway_with_honor_labels_flower_and_itself(
        embedded_stack: LocalStack, tmp_path: Path) -> None:
    gateway = pushgateway(tmp_path).start()
    flower_port, prometheus_port = free_port(), free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "textnlp_jobs.cli", "flower", "--port", str(flower_port)], cwd=REPO_ROOT,
        env=embedded_stack.process_env({"TEXTNLP_FLOWER_BASIC_AUTH": "ops:s3cret"}),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    config = prometheus_config(tmp_path, {"pushgateway:9091": f"127.0.0.1:{gateway.port}",
                                          "flower:5555": f"127.0.0.1:{flower_port}",
                                          "localhost:9090": f"127.0.0.1:{prometheus_port}"})
    prometheus = Service([need("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prometheus_port}"], prometheus_port,
                         tmp_path / "prometheus.log", ready_path="/-/ready")
    try:
        registry = CollectorRegistry()
        Gauge("textnlp_worker_up", "up", ["device"], registry=registry).labels("cuda.0").set(1)
        assert Pusher(gateway.url, DEVICE_WORKER_JOB, "gpu-host-1:cuda.0", interval=1, timeout=2,
                      registry=registry).push()
        wait_for_http(f"http://127.0.0.1:{flower_port}/healthcheck", timeout=60)
        prometheus.start()
        url = prometheus.url

        def all_up() -> bool:
            return {r["metric"]["job"]: r["value"][1] for r in query(url, "up")} == {
                "pushgateway": "1", "flower": "1", "prometheus": "1"}
        wait_for(all_up, 30, "Prometheus scraped the pushgateway, Flower and itself")
        (series,) = query(url, "textnlp_worker_up")
        assert series["metric"]["job"] == DEVICE_WORKER_JOB  # honor_labels: the pusher's job, not "pushgateway"
        assert series["metric"]["instance"] == "gpu-host-1:cuda.0" and series["metric"]["device"] == "cuda.0"

        with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as response:
            groups = json.load(response)["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 13 and all(rule["health"] != "err" for rule in rules), rules
        with pytest.raises(urllib.error.HTTPError) as refused:  # Flower's pages still need the credentials
            urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/workers", timeout=5)
        assert refused.value.code == 401
    finally:
        prometheus.stop()
        gateway.stop()
        os.killpg(flower.pid, 15)
        flower.wait(20)
