"""ops/ is tested code: alert rules and dashboards name only metrics the code defines, every alert
has a severity, a summary and a runbook section that exists, every Grafana panel uses the
provisioned datasource, and the real promtool and amtool accept the files."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import textnlp_jobs.metrics
from textnlp_jobs.local_stack import REPO_ROOT
from textnlp_jobs.metrics.registry import REGISTRY

from .ops_services import need

OPS = REPO_ROOT / "ops"
RULES = sorted((OPS / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
# Series that Prometheus and the pushgateway add themselves.
EXTERNAL = {"up", "push_time_seconds", "push_failure_time_seconds"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "rate", "irate", "increase", "delta", "deriv", "histogram_quantile", "time",
    "bool", "offset", "clamp_min", "clamp_max", "topk", "bottomk", "abs", "absent", "vector", "scalar",
}


def defined_metric_names() -> set[str]:
    """Every sample name the code's registry can expose (counters as *_total, histograms as
    *_bucket/_sum/_count), after importing every module of textnlp_jobs.metrics; plus Flower's."""
    for module in pkgutil.iter_modules(textnlp_jobs.metrics.__path__):
        importlib.import_module(f"textnlp_jobs.metrics.{module.name}")
    names = set(EXTERNAL)
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created"], "gauge": [""], "info": ["_info"]}
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    names.update(flower_metric_names())
    return names


def flower_metric_names() -> set[str]:
    """Flower's own /metrics (its PrometheusMetrics registers them in the default registry)."""
    import flower.options  # noqa: F401  (defines the options PrometheusMetrics reads; Flower 2.0 has no defaults)
    import prometheus_client
    from flower.events import PrometheusMetrics

    try:
        PrometheusMetrics()
    except ValueError:  # already registered in this process
        pass
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("flower_"):
            names.update({family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_sum",
                          f"{family.name}_count"})
    return names


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, grouping labels, durations,
    strings and numbers removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"#[^\n]*", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]?|e\d+", w)}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def dashboard_targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found.append((path.name, panel, target))
    return found


def test_the_query_checker_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (model_name, le) (rate(textnlp_x_bucket{a="b c"}[5m])))'
            ' / on (job) group_left up > 2 * max without (instance) (push_time_seconds)')
    assert metric_names_in(expr) == {"textnlp_x_bucket", "up", "push_time_seconds"}


def test_every_alert_rule_names_only_metrics_the_code_defines() -> None:
    defined = defined_metric_names()
    rules = alert_rules()
    assert len(rules) >= 13
    for rule in rules:
        names = metric_names_in(rule["expr"])
        assert names, rule["alert"]
        assert names <= defined, (rule["alert"], names - defined)


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section_that_exists() -> None:
    runbooks = (REPO_ROOT / "docs" / "runbooks.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbooks, flags=re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/runbooks.md" and anchor in anchors, (rule["alert"], anchor)
        assert anchor == rule["alert"].lower()


def test_the_job_system_alerts_the_issue_names_are_all_there() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"ServiceDown", "HighErrorRate", "SlowInferenceP95", "GPUMemoryHigh", "DiskLow", "QueueBacklogGrowing",
            "OldestQueuedJobTooOld", "JobsGoingDead", "MaintenanceTaskFailed", "MaintenanceTaskNotSucceeding",
            "PusherSilent", "NoWorkerForModelQueue"} <= names


def test_every_dashboard_query_names_only_metrics_the_code_defines() -> None:
    defined = defined_metric_names()
    targets = dashboard_targets()
    assert {path for path, _, _ in targets} == {"jobs-and-queues.json", "model-performance.json",
                                                "maintenance.json", "workers.json"}
    for path, panel, target in targets:
        names = metric_names_in(target["expr"])
        assert names, (path, panel["title"])
        assert names <= defined, (path, panel["title"], names - defined)


def test_every_panel_uses_the_provisioned_datasource() -> None:
    provisioning = OPS / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for path, panel, target in dashboard_targets():
        for datasource in (panel["datasource"], target["datasource"]):
            assert datasource == {"type": source["type"], "uid": source["uid"]}, (path, panel["title"])
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_the_committed_dashboards_are_what_the_builder_writes(tmp_path: Path) -> None:
    builder = OPS / "grafana" / "build_dashboards.py"
    source = builder.read_text().replace('OUT = Path(__file__).resolve().parent / "dashboards"',
                                         f"OUT = Path({str(tmp_path)!r})")
    script = tmp_path / "build.py"
    script.write_text(source)
    subprocess.run(["python3", str(script)], check=True)
    for path in DASHBOARDS:
        assert json.loads((tmp_path / path.name).read_text()) == json.loads(path.read_text()), path.name


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False)


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    checked = promtool("check", "config", "ops/prometheus/prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", *(str(p.relative_to(REPO_ROOT)) for p in RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_rule_tests_pass_with_a_firing_and_a_silent_case_per_alert() -> None:
    tests = sorted((OPS / "prometheus" / "tests").glob("*.yml"))
    result = promtool("test", "rules", *(str(p.relative_to(REPO_ROOT)) for p in tests))
    assert result.returncode == 0, result.stdout + result.stderr
    fired: set[str] = set()
    silent: set[str] = set()
    for path in tests:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else silent).add(check["alertname"])
    every = {rule["alert"] for rule in alert_rules()}
    assert fired == every and silent == every


@pytest.mark.parametrize("webhook", [None, "https://hooks.example.com/textnlp?token=abc"])
def test_amtool_accepts_the_alertmanager_config_as_committed_and_as_the_entrypoint_renders_it(
        tmp_path: Path, webhook: str | None) -> None:
    config = (OPS / "alertmanager" / "alertmanager.yml").read_text()
    if webhook:
        config = config.replace("http://critical.webhook.invalid", webhook).replace(
            "http://warning.webhook.invalid", webhook)
    path = tmp_path / "alertmanager.yml"
    path.write_text(config)
    result = subprocess.run([need("amtool"), "check-config", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    routes = yaml.safe_load(config)["route"]["routes"]
    assert {r["receiver"] for r in routes} == {"critical", "warning"}
