"""The README's Python blocks run as written against the embedded default, so they stay true."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.worker_main import worker_hostname

pytestmark = [pytest.mark.slow]

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_python_blocks() -> list[str]:
    return PYTHON_BLOCK.findall((REPO_ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks_to_run() -> None:
    assert len(readme_python_blocks()) >= 2


def test_the_readme_python_blocks_run_against_the_embedded_default(embedded_stack: LocalStack) -> None:
    embedded_stack.device_worker("cpu.0").start()
    embedded_stack.wait_ready(worker_hostname(embedded_stack.settings(), "cpu.0"))
    program = "\n\n".join(readme_python_blocks())
    done = subprocess.run([sys.executable, "-c", program], cwd=embedded_stack.workdir,
                          env=embedded_stack.process_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("succeeded ")
    assert "input.prompt_too_long prompt: is 20000 bytes, over the limit of 16384 bytes" in done.stdout
