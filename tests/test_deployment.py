"""docker-compose.yml is read as configuration here (no Docker engine on CI): one worker per GPU,
pinned, every role present, no secret written into the file."""

from __future__ import annotations

import re
from typing import Any

import yaml

from textnlp_jobs.local_stack import REPO_ROOT


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def test_every_role_of_the_stack_is_a_service() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "migrate", "maintenance", "beat", "flower"} <= set(services)
    assert services["beat"]["command"] == ["beat"]
    assert services["maintenance"]["command"] == ["worker", "--maintenance"]


def test_each_gpu_worker_is_pinned_to_the_gpu_its_command_names() -> None:
    workers = {name: svc for name, svc in compose()["services"].items() if name.startswith("worker-gpu")}
    assert workers
    for name, service in workers.items():
        index = name.removeprefix("worker-gpu")
        assert service["command"] == ["worker", "--device", f"cuda.{index}"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [index] and device["capabilities"] == ["gpu"]


def test_secrets_come_from_the_environment_and_flower_needs_auth() -> None:
    text = (REPO_ROOT / "docker-compose.yml").read_text()
    assert re.search(r"postgresql\+psycopg://textnlp:\$\{POSTGRES_PASSWORD", text)
    flower = compose()["services"]["flower"]
    assert flower["environment"]["TEXTNLP_FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_the_image_installs_the_built_wheel_not_a_checkout() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile and "/wheels/*.whl" in dockerfile
    assert "pip install --no-cache-dir -e" not in dockerfile and "COPY workers" not in dockerfile
