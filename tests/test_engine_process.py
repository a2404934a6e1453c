"""The device worker's two halves: the engine process and the consumer step that feeds it."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import DeviceWorker
from textnlp_jobs.errors import (
    ErrorCode,
    InputError,
    JobDroppedError,
    OutOfMemoryError,
    TextNLPError,
    WorkerShuttingDownError,
)
from textnlp_jobs.generation_consumer import job_id_of
from textnlp_jobs.inference import engine_process
from textnlp_jobs.inference.engine_process import error_from, error_payload
from textnlp_jobs.local_stack import LocalStack, WorkerProcess
from workers.device import worker_hostname

from .conftest import TEST_NODE
from .helpers import assert_each_succeeded_exactly_once, job_specs, statuses, wait_until_final

JOB = str(uuid.uuid4())


def generate_headers(**extra: object) -> dict[str, object]:
    return {"task": "textnlp.generate", "id": JOB, **extra}


@pytest.mark.parametrize(("headers", "body", "reason"), [
    (generate_headers(), [[JOB], {}, {}], ""),
    ({"task": "no.such.task", "id": JOB}, [[JOB], {}, {}], "unknown_task"),
    (None, [[JOB], {}, {}], "unknown_task"),
    ({"task": "textnlp.generate"}, [[JOB], {}, {}], "malformed_task_message"),
    (generate_headers(), "not a list", "malformed_task_message"),
    (generate_headers(), [[], {}, {}], "bad_arguments"),
    (generate_headers(), [[JOB, JOB], {}, {}], "bad_arguments"),
    (generate_headers(), [[JOB], {"x": 1}, {}], "bad_arguments"),
    (generate_headers(), [["../../etc/passwd"], {}, {}], "bad_arguments"),
    (generate_headers(), [[42], {}, {}], "bad_arguments"),
])
def test_only_a_generate_call_with_one_job_id_is_a_job(headers: object, body: object, reason: str) -> None:
    job_id, why = job_id_of(headers, body)
    assert why == reason
    assert (job_id == uuid.UUID(JOB)) if not reason else job_id is None


@pytest.mark.parametrize("error", [
    JobDroppedError("cancelled"), WorkerShuttingDownError("stopping"), OutOfMemoryError("too big"),
])
def test_an_error_from_the_engine_process_keeps_its_class_code_and_message(error: TextNLPError) -> None:
    rebuilt = error_from(error_payload(error))
    assert type(rebuilt) is type(error)
    assert (rebuilt.code, rebuilt.message, rebuilt.retryable) == (error.code, error.message, error.retryable)


def test_an_error_whose_class_takes_other_arguments_keeps_its_code_message_and_retryability() -> None:
    error = InputError("prompt", "is 2000 tokens, over the limit of 1024 tokens",
                       code=ErrorCode.INPUT_PROMPT_TOO_MANY_TOKENS)
    rebuilt = error_from(error_payload(error))
    assert isinstance(rebuilt, TextNLPError)
    assert (rebuilt.code, rebuilt.message, rebuilt.retryable) == (error.code, error.message, False)
    anything = error_from(error_payload(ValueError("boom")))
    assert anything.code == ErrorCode.INFERENCE_FAILED and "ValueError: boom" in anything.message


class RecordingPipe:
    """The engine process's end of its pipe, as far as the results sender uses it."""

    def __init__(self) -> None:
        self.sent: queue.Queue[tuple[Any, ...]] = queue.Queue()

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.put(message)

    def next_kind(self) -> str:
        return str(self.sent.get(timeout=30)[0])


def test_results_sent_without_a_snapshot_are_followed_by_one_well_before_the_idle_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # With the idle snapshot an hour away, the metrics after a rate-limited send can only come
    # from the trailing one: the worker's view of the engine must not lag a burst's end by that.
    monkeypatch.setattr(engine_process, "SNAPSHOT_AT_LEAST", 3600.0)
    monkeypatch.setattr(engine_process, "SNAPSHOT_EVERY", 1.0)
    pipe, results = RecordingPipe(), engine_process._Outbox()
    sender = threading.Thread(target=engine_process._send_results, args=(pipe, results), daemon=True)
    sender.start()
    results.put(("a", None, None))
    assert [pipe.next_kind(), pipe.next_kind()] == ["results", "metrics"]
    results.put(("b", None, None))  # within SNAPSHOT_EVERY of that snapshot: sent alone
    assert [pipe.next_kind(), pipe.next_kind()] == ["results", "metrics"]
    results.close()
    sender.join(30)
    assert not sender.is_alive()


def test_results_put_inside_a_held_block_are_taken_together_after_it() -> None:
    results = engine_process._Outbox()
    with results.held():
        results.put("a")
        assert results.take_all(timeout=0.05) == []  # the sender waits for the block's end
        results.put("b")
    assert results.take_all(timeout=5) == ["a", "b"]
    results.put("c")  # outside a block: taken at once, as before
    assert results.take_all(timeout=5) == ["c"]
    results.close()
    assert results.take_all() is None


def engine_pid(worker_pid: int) -> int:
    """The worker's child that runs its models (a multiprocessing spawn)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == worker_pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no engine process under worker {worker_pid}")


def worker_pid(client: Client) -> int:
    with client.sessions() as session:
        row = session.execute(select(DeviceWorker).where(DeviceWorker.name == f"{TEST_NODE}/cpu.0")).scalar_one()
    return int(row.pid)


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def ready_worker(stack: LocalStack) -> WorkerProcess:
    worker = stack.device_worker("cpu.0").start()
    stack.wait_ready(worker_hostname(stack.settings(), "cpu.0"))
    return worker


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_engine_process_stops_its_worker_non_zero_and_loses_no_job(stack: LocalStack) -> None:
    worker = ready_worker(stack)
    client = Client(stack.settings())
    engine = engine_pid(worker_pid(client))
    ids = [job.id for job in client.submit_many(job_specs(60, max_new_tokens=24))]
    while statuses(client, ids).get("succeeded", 0) < 10:
        assert worker.alive, worker.log_tail()
        time.sleep(0.05)
    os.kill(engine, signal.SIGKILL)
    assert worker.process is not None
    status = worker.process.wait(timeout=120)
    assert status != 0, worker.log_tail()
    assert "engine_process_died" in worker.log_tail(200)
    assert gone(engine)
    # A replacement worker (what the supervisor starts) finishes every job, each written once.
    replacement = ready_worker(stack)
    final = wait_until_final(client, ids, timeout=240, reconcile_every=5)
    assert_each_succeeded_exactly_once(client, ids, final, replacement.log_tail())


@pytest.mark.slow
def test_a_spawned_engine_process_reports_its_load_failure_at_start_and_a_stop_before_start_ends_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker spawns its engine process first thing (its imports take most of a start-up) and
    # says load only after registering the device; a refused worker stops the child at once.
    monkeypatch.setenv("TEXTNLP_HOME", str(tmp_path))  # an empty home: nothing can load there
    never_started = engine_process.RemoteEngineSide("cpu.0", ["demo"], start_timeout=120)
    never_started.spawn()
    never_started.stop(timeout=30)
    assert never_started.pid is not None and gone(never_started.pid)
    started = engine_process.RemoteEngineSide("cpu.0", ["demo"], start_timeout=120)
    started.spawn()
    started.spawn()  # a second call starts no second child
    pid = started.pid
    with pytest.raises(TextNLPError):  # the load, at start, fails on the empty home: reported here
        started.start()
    assert started.pid == pid and gone(pid)


@pytest.mark.integration
@pytest.mark.slow
def test_a_sigkilled_worker_leaves_no_engine_process_behind(stack: LocalStack) -> None:
    worker = ready_worker(stack)
    pid = worker_pid(Client(stack.settings()))
    engine = engine_pid(pid)
    os.kill(pid, signal.SIGKILL)
    give_up = time.monotonic() + 30
    while not gone(engine):
        assert time.monotonic() < give_up, worker.log_tail()
        time.sleep(0.1)


@pytest.mark.integration
def test_a_ready_worker_and_its_engine_process_keep_their_start_up_heap_out_of_collections(
        stack: LocalStack) -> None:
    # A full collection walking the models and the imported libraries stalled the decode loop (and
    # the worker's claims and writes) for about 200 ms once or twice a run (heap.py).
    worker = ready_worker(stack)
    give_up = time.monotonic() + 60
    while not all(f"start_up_heap_frozen process={p}" in worker.log_tail(400) for p in ("engine", "device_worker")):
        assert worker.alive and time.monotonic() < give_up, worker.log_tail()
        time.sleep(0.2)
    client = Client(stack.settings())
    ids = [job.id for job in client.submit_many(job_specs(4, max_new_tokens=4))]
    assert_each_succeeded_exactly_once(client, ids, wait_until_final(client, ids, timeout=120), worker.log_tail())
