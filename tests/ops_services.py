"""Real operator services for tests, each our own process on a free port with a temporary data
directory: the Prometheus pushgateway, Prometheus, and a scratch Redis that a test may stop."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(binary: str) -> str:
    """The path of ``binary``; skipped on a laptop without it, a failure under CI (which installs it)."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (bash .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                response.read()
                return
        except OSError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)


def wait_for(condition: object, timeout: float, what: str) -> None:
    """Poll ``condition()`` until it is truthy."""
    assert callable(condition)
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


@dataclass
class Service:
    """One server process we started and may stop, and start again on the same port."""

    command: list[str]
    port: int
    log_path: Path
    ready_path: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.ready_path is not None:
            wait_for_http(self.url + self.ready_path)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pushgateway(tmp_path: Path) -> Service:
    binary = need("prometheus-pushgateway")
    port = free_port()
    # An empty persistence file keeps everything in memory (the Debian default writes under /var/lib).
    return Service([binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                   port, tmp_path / "pushgateway.log", ready_path="/-/ready")


def scratch_redis_server(tmp_path: Path) -> Service:
    binary = need("redis-server")
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir(exist_ok=True)
    return Service([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(data)], port, tmp_path / "redis.log")


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def scrape(url: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition at ``url``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    samples = []
    for line in body.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group("labels") or ""))
            samples.append(Sample(match.group("name"), labels, float(match.group("value"))))
    return samples


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels`` (None if none)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None
