"""The `textnlp-jobs` command on the embedded default, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from textnlp_jobs.local_stack import REPO_ROOT, LocalStack

pytestmark = [pytest.mark.slow]


def cli(stack: LocalStack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT,
                          env=stack.process_env({"COLUMNS": "200"}), capture_output=True, text=True, timeout=timeout)


def test_submit_wait_status_list_cancel_and_check(embedded_stack: LocalStack) -> None:
    embedded_stack.device_worker("cpu.0").start()
    done = cli(embedded_stack, "submit", "Return a new list", "--model", "demo", "--max-new-tokens", "8", "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()  # the generated text

    queued = cli(embedded_stack, "submit", "Create a new thread", "--model", "demo", "--priority", "3")
    job_id = queued.stdout.strip()
    assert len(job_id) == 36, queued.stdout

    status = cli(embedded_stack, "status", job_id)
    assert job_id in status.stdout
    listing = cli(embedded_stack, "jobs", "list", "--limit", "5")
    assert listing.returncode == 0 and "demo" in listing.stdout
    cancel = cli(embedded_stack, "cancel", job_id)  # the worker may have finished it already (exit 3)
    assert (cancel.returncode == 0 and job_id in cancel.stdout) or (
        cancel.returncode == 3 and "already finished" in cancel.stderr), cancel.stdout + cancel.stderr

    check = cli(embedded_stack, "check")
    assert check.returncode == 0 and "ledger: ok" in check.stdout and "broker: ok" in check.stdout
    dry_run = cli(embedded_stack, "maintenance", "run", "jobs.reconcile", "--dry-run")
    assert dry_run.returncode == 0 and "'dry_run': True" in dry_run.stdout


def test_bad_input_exits_2_with_the_field_and_the_limit(embedded_stack: LocalStack) -> None:
    empty = cli(embedded_stack, "submit", " ", "--model", "demo")
    assert empty.returncode == 2
    assert "input.prompt_empty" in empty.stderr and "prompt: is empty" in empty.stderr
    too_many = cli(embedded_stack, "submit", "hello", "--model", "demo", "--max-new-tokens", "100000")
    assert too_many.returncode == 2 and "outside the allowed range [1, 512]" in too_many.stderr
    unknown = cli(embedded_stack, "submit", "hello", "--model", "nope")
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr


def test_flower_refuses_to_start_without_credentials(embedded_stack: LocalStack) -> None:
    refused = cli(embedded_stack, "flower", timeout=60)
    assert refused.returncode == 2 and "TEXTNLP_FLOWER_BASIC_AUTH" in refused.stderr


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_flower_answers_only_with_its_credentials(embedded_stack: LocalStack) -> None:
    import base64
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    env = embedded_stack.process_env({"TEXTNLP_FLOWER_BASIC_AUTH": "ops:s3cret-pass"})
    flower = subprocess.Popen([sys.executable, "-m", "textnlp_jobs.cli", "flower", "--port", str(port)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def status(credentials: str | None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/")
        if credentials:
            request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    try:
        for _ in range(120):
            try:
                first = status(None)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        else:
            raise AssertionError("Flower did not start")
        assert first == 401
        assert status("ops:wrong") == 401
        assert status("ops:s3cret-pass") == 200
    finally:
        flower.terminate()
        flower.wait(20)
