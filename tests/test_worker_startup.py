"""A device worker refuses settings that could run a job twice at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from textnlp_jobs.errors import ConfigurationError
from textnlp_jobs.local_stack import REPO_ROOT
from textnlp_jobs.settings import Settings
from workers.device import check_timeouts


def test_a_visibility_timeout_shorter_than_the_longest_job_is_refused() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:6379/15", visibility_timeout=60, max_job_seconds=300,
                        home="/tmp/unused")
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        check_timeouts(settings)


def test_a_lease_shorter_than_the_longest_job_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="lease"):
        check_timeouts(Settings(lease_seconds=10, max_job_seconds=30, home="/tmp/unused"))


def test_the_worker_process_exits_with_a_clear_message(tmp_path) -> None:
    env = {"TEXTNLP_HOME": str(tmp_path), "TEXTNLP_BROKER_URL": "redis://127.0.0.1:6379/15",
           "TEXTNLP_VISIBILITY_TIMEOUT": "10", "TEXTNLP_MAX_JOB_SECONDS": "300", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "workers.device", "--device", "cpu.0"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "must exceed the longest allowed job" in done.stderr
