"""`worker --all-devices` supervision: crashed workers come back with backoff, siblings keep
running, and the exit status tells the truth."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from textnlp_jobs.supervisor import Supervisor, exit_status

CLEAN_ON_TERM = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit({code}));"


def child(script: str, term_code: int = 0) -> list[str]:
    return [sys.executable, "-c", CLEAN_ON_TERM.format(code=term_code) + script]


def run_in_thread(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, result


def wait_for(condition: object, timeout: float = 30.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < give_up, "condition not reached"
        time.sleep(0.05)


def test_a_crashed_worker_is_restarted_with_backoff_and_its_sibling_keeps_running(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crasher = child(f"f = open({str(starts)!r}, 'a'); f.write('x'); f.close(); "
                    f"n = len(open({str(starts)!r}).read()); sys.exit(1) if n <= 2 else time.sleep(600)")
    steady = child("time.sleep(600)")
    supervisor = Supervisor({"cpu.0": crasher, "cpu.1": steady}, backoff=(0.2, 1.0), poll=0.05)
    thread, result = run_in_thread(supervisor)
    wait_for(lambda: starts.exists() and len(starts.read_text()) >= 3)
    crashed, sibling = supervisor.children
    wait_for(lambda: crashed.process is not None)
    assert crashed.restarts == 2 and crashed.statuses == [1, 1]
    assert sibling.restarts == 0 and sibling.process is not None and sibling.process.poll() is None
    supervisor.stop()
    thread.join(30)
    assert result == [0]  # both stopped cleanly when asked


def test_the_exit_status_is_not_zero_when_a_worker_does_not_stop_cleanly() -> None:
    supervisor = Supervisor({"cpu.0": child("time.sleep(600)"), "cpu.1": child("time.sleep(600)", term_code=1)},
                            poll=0.05)
    thread, result = run_in_thread(supervisor)
    wait_for(lambda: all(c.process is not None for c in supervisor.children))
    time.sleep(0.5)  # let the children install their handlers
    supervisor.stop()
    thread.join(30)
    assert result == [1]


def test_a_worker_killed_by_a_signal_reports_128_plus_the_signal() -> None:
    assert exit_status(-9) == 137 and exit_status(-15) == 143 and exit_status(0) == 0 and exit_status(3) == 3


def test_a_worker_refused_by_its_configuration_is_not_restarted() -> None:
    supervisor = Supervisor({"cpu.0": child("sys.exit(2)")}, backoff=(0.05, 0.1), poll=0.05)
    assert supervisor.run() == 2
    assert supervisor.children[0].restarts == 0 and supervisor.children[0].given_up


def test_a_device_worker_whose_celery_worker_stopped_on_an_error_exits_non_zero(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from textnlp_jobs import worker_main

    monkeypatch.setattr(worker_main, "run_device_worker", lambda *args, **kwargs: 1)  # Celery's EX_FAILURE
    with pytest.raises(SystemExit) as stopped:
        worker_main.device_main(["--device", "cpu.0"])
    assert stopped.value.code == 1
