"""The systemd units in ops/systemd are valid units that start what the README says."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from textnlp_jobs.local_stack import REPO_ROOT

UNITS = REPO_ROOT / "ops" / "systemd"
EXPECTED = {
    "textnlp-worker@.service": "worker --device %i",
    "textnlp-maintenance.service": "worker --maintenance",
    "textnlp-beat.service": "beat",
    "textnlp-flower.service": "flower --address 127.0.0.1 --port 5555",
}


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_each_long_running_service_has_a_unit_that_runs_the_cli() -> None:
    for name, command in EXPECTED.items():
        unit = _unit(name)
        start = unit["Service"]["ExecStart"]
        assert start.startswith("/opt/textnlp/venv/bin/textnlp-jobs ") and start.endswith(command), (name, start)
        assert unit["Service"]["EnvironmentFile"] == "/etc/textnlp/textnlp.env"
        assert unit["Service"]["User"] == "textnlp"
        assert unit["Service"]["RestartPreventExitStatus"] == "2"  # configuration errors are not retried
        assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the parse test above still runs)")
    env_file = tmp_path / "textnlp.env"
    env_file.write_text((UNITS / "textnlp.env.example").read_text())
    # verify checks that ExecStart's program exists: point it at one that does.
    program = shutil.which("true") or "/bin/true"
    for name in EXPECTED:
        text = (UNITS / name).read_text()
        text = text.replace("/opt/textnlp/venv/bin/textnlp-jobs", program).replace("/etc/textnlp/textnlp.env",
                                                                                  str(env_file))
        (tmp_path / name).write_text(text)
    targets = [f"./{name.replace('@.', '@cpu.0.')}" for name in EXPECTED]
    done = subprocess.run([analyze, "verify", *targets], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "textnlp" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr
