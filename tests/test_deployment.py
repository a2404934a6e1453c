"""docker-compose.yml is read as configuration here (no Docker engine on CI): one worker per GPU,
pinned, every role present, no secret written into the file."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from textnlp_jobs.constants import generation_queue
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


# --- the observability services, and what every textnlp-jobs container is told -----------------
def cli_root() -> Any:
    import typer

    from textnlp_jobs.cli import app

    return typer.main.get_command(app)


def is_group(command: Any) -> bool:
    return hasattr(command, "commands")  # typer vendors click: duck-type its Group


def real_cli_command(args: list[str]) -> bool:
    """True when ``textnlp-jobs ARGS`` names a real command (not a group) and its options parse."""
    command, rest = cli_root(), list(args)
    while is_group(command) and rest and not rest[0].startswith("-"):
        command, rest = command.commands.get(rest[0]), rest[1:]
        if command is None:
            return False
    if is_group(command):
        return False
    try:
        command.make_context("textnlp-jobs", rest)
    except Exception:  # click's UsageError / BadParameter, from typer's vendored click
        return False
    return True


def cli_envvars() -> set[str]:
    found: set[str] = set()

    def walk(command: Any) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            found.update([envvar] if isinstance(envvar, str) else envvar or [])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)
    walk(cli_root())
    return found


def read_by_the_code(name: str) -> bool:
    return any(f'"{name}"' in path.read_text() for path in (REPO_ROOT / "textnlp_jobs").rglob("*.py"))


def is_real_variable(name: str) -> bool:
    """A TEXTNLP_* variable is a Settings field, the envvar of a CLI option, or read by name in the code."""
    from textnlp_jobs.settings import Settings

    return (name.removeprefix("TEXTNLP_").lower() in Settings.model_fields or name in cli_envvars()
            or read_by_the_code(name))


def textnlp_services() -> dict[str, Any]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("image", "").startswith("textnlp-jobs")}


def test_the_checks_behind_the_compose_and_k8s_tests_refuse_what_is_not_real() -> None:
    assert real_cli_command(["worker", "--device", "cuda.0"]) and real_cli_command(["health", "--json"])
    assert not real_cli_command(["wrker"]) and not real_cli_command(["worker", "--no-such-flag"])
    assert not real_cli_command(["db"])  # a group, not a command
    assert is_real_variable("TEXTNLP_PUSHGATEWAY_URL") and is_real_variable("TEXTNLP_FLOWER_PORT")
    assert not is_real_variable("TEXTNLP_PUSHGATEWAY")


def test_the_observability_stack_is_in_compose_with_healthchecks_and_ordered_starts() -> None:
    services = compose()["services"]
    for name in ("pushgateway", "prometheus", "alertmanager", "grafana", "flower"):
        assert services[name]["healthcheck"]["test"], name
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    assert services["prometheus"]["depends_on"]["pushgateway"] == {"condition": "service_healthy"}
    assert services["grafana"]["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    for name, service in textnlp_services().items():
        assert service["environment"]["TEXTNLP_PUSHGATEWAY_URL"] == "http://pushgateway:9091", name


def test_every_file_compose_mounts_exists_where_the_service_reads_it() -> None:
    services = compose()["services"]
    mounts = {}
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), (name, source)
                mounts[target] = REPO_ROOT / source
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for pattern in prometheus["rule_files"]:  # relative to the config file's folder
        assert list((REPO_ROOT / "ops/prometheus").glob(pattern)) and (
            "/etc/prometheus/" + pattern.split("/")[0] in mounts)
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"pushgateway:9091", "flower:5555"} <= targets
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards/textnlp.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in mounts
    alertmanager = " ".join(services["alertmanager"]["command"])
    config = mounts["/etc/alertmanager/alertmanager.yml"].read_text()
    for placeholder in re.findall(r"http://\w+\.webhook\.invalid", config):
        assert placeholder in alertmanager


def test_every_textnlp_variable_in_compose_is_a_real_setting_and_every_command_a_real_cli_command() -> None:
    for name, service in textnlp_services().items():
        for variable in service["environment"]:
            if variable.startswith("TEXTNLP_"):
                assert is_real_variable(variable), (name, variable)
        assert real_cli_command(service["command"]), (name, service["command"])


# --- Kubernetes ---------------------------------------------------------------------------------
def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((REPO_ROOT / "ops/k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Deployment"}


def test_the_k8s_manifests_use_the_real_image_commands_and_settings() -> None:
    import tomllib

    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    config = next(d for d in k8s_documents() if d["kind"] == "ConfigMap")
    assert all(is_real_variable(key) for key in config["data"]), config["data"]
    kustomized = yaml.safe_load((REPO_ROOT / "ops/k8s/kustomization.yaml").read_text())["resources"]
    assert sorted(kustomized) == sorted(p.name for p in (REPO_ROOT / "ops/k8s").glob("*.yaml")
                                        if p.name != "kustomization.yaml")
    for name, deployment in deployments().items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"textnlp-jobs:{version}", name
        assert real_cli_command(container["args"]), (name, container["args"])
        for variable in container.get("env", []):
            assert is_real_variable(variable["name"]), (name, variable["name"])
        assert {"configMapRef": {"name": "textnlp-config"}} in container["envFrom"]


def test_each_gpu_pool_runs_one_gpu_per_pod_serving_the_models_of_its_keda_queue() -> None:
    pools = {name: d for name, d in deployments().items()
             if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gpu-worker"}
    assert len(pools) >= 2
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in k8s_documents() if d["kind"] == "ScaledObject"}
    assert set(scaled) == set(pools)
    for name, pool in pools.items():
        (container,) = pool["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["args"] == ["worker", "--device", "cuda.0"]
        env = {e["name"]: e for e in container["env"]}
        placement = json.loads(env["TEXTNLP_PLACEMENT"]["value"])
        assert env["TEXTNLP_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        (trigger,) = scaled[name]["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] in {generation_queue(m) for m in placement["cuda.0"]}


def test_beat_runs_exactly_once_and_flower_requires_its_credentials() -> None:
    beat = deployments()["textnlp-beat"]
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    (flower,) = deployments()["textnlp-flower"]["spec"]["template"]["spec"]["containers"]
    assert {"secretRef": {"name": "textnlp-secrets"}} in flower["envFrom"]
    assert "TEXTNLP_FLOWER_BASIC_AUTH" in (REPO_ROOT / "ops/k8s/README.md").read_text()
    assert "maintenance" in "".join(c for d in deployments().values()
                                    for c in d["spec"]["template"]["spec"]["containers"][0]["args"])


def test_the_image_installs_the_built_wheel_not_a_checkout() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile and "/wheels/*.whl" in dockerfile
    assert "pip install --no-cache-dir -e" not in dockerfile and "COPY workers" not in dockerfile
