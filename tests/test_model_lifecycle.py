"""A model's whole life while jobs run: register, promote, serve, promote a new version, roll back,
and the old version serves again; no job fails, every row names the version that produced it, and
a running worker switches without a restart."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import ModelLoad
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.inference import registry
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.worker_main import worker_hostname

from .helpers import PROMPTS
from .test_model_maintenance import flip_one_byte
from .test_model_registry import variant

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER_ENV = {"TEXTNLP_MODEL_POLL_SECONDS": "0.5", "TEXTNLP_MODEL_HEARTBEAT_SECONDS": "1",
              "TEXTNLP_MAX_JOB_SECONDS": "60", "TEXTNLP_LEASE_SECONDS": "90", "TEXTNLP_VISIBILITY_TIMEOUT": "120"}


class Producer(threading.Thread):
    """Submits a job every few hundred milliseconds until stopped, like live traffic."""

    def __init__(self, client: Client, model: str) -> None:
        super().__init__(daemon=True)
        self.client, self.model = client, model
        self.ids: list[uuid.UUID] = []
        self.halt = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.halt.is_set():
            job = self.client.submit(f"{PROMPTS[count % len(PROMPTS)]} {count}", model=self.model, max_new_tokens=6)
            self.ids.append(job.id)
            count += 1
            self.halt.wait(0.3)


def wait_for_version(client: Client, producer: Producer, version: str, after: int, timeout: float = 120) -> None:
    """Until a job submitted after position ``after`` succeeded on ``version``."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        jobs = client.get_many(producer.ids[after:]) if len(producer.ids) > after else []
        if any(j.status == "succeeded" and j.model_version == version for j in jobs):
            return
        time.sleep(0.5)
    raise AssertionError(f"no job served by {version} within {timeout}s")


def test_promote_then_roll_back_while_jobs_run_switches_versions_without_a_failed_job(
        stack: LocalStack, tiny_model: Path, tmp_path: Path) -> None:
    settings = stack.settings()
    factory = session_factory(settings)
    source = Path(shutil.copytree(tiny_model, tmp_path / "life"))
    first = registry.register_directory(settings, factory, source, "life").version
    second = registry.register_directory(settings, factory, variant(source, "v2"), "life").version
    with factory.begin() as session:
        registry.promote(session, "life", first, "production")
    worker = stack.device_worker("cpu.0", extra_env={**WORKER_ENV, "TEXTNLP_PLACEMENT": json.dumps({"*": ["life"]})})
    worker.start()
    client = Client(settings)
    stack.wait_ready(worker_hostname(settings, "cpu.0"), timeout=180)
    producer = Producer(client, "life")
    producer.start()
    try:
        wait_for_version(client, producer, first, 0)
        with factory.begin() as session:
            registry.promote(session, "life", second, "production")
        wait_for_version(client, producer, second, len(producer.ids))
        with factory.begin() as session:
            registry.rollback(session, "life", "production")
        wait_for_version(client, producer, first, len(producer.ids))
        settled = len(producer.ids)
        time.sleep(2)
    finally:
        producer.halt.set()
        producer.join(30)
    done = client.wait(producer.ids, timeout=180)
    assert [j.status for j in done] == ["succeeded"] * len(done), worker.log_tail()
    versions = [j.model_version for j in done]
    assert set(versions) == {first, second}  # every row names the version that produced it
    assert set(versions[settled + 2:]) <= {first}  # after the rollback settled, only the old version serves
    with factory() as session:
        row = registry.get_version(session, "life", first)[1]
        assert row.last_used_at is not None  # recorded by the worker's heartbeat, not per job
        loads = session.execute(select(ModelLoad.model_version_id)).scalars().all()
        assert row.id in loads


def test_a_worker_refuses_to_load_a_version_that_validation_found_corrupt(
        stack: LocalStack, tiny_model: Path, tmp_path: Path) -> None:
    from textnlp_jobs.maintenance import models as tasks

    from .test_model_maintenance import job

    settings = stack.settings()
    factory = session_factory(settings)
    done = registry.register_directory(settings, factory, Path(shutil.copytree(tiny_model, tmp_path / "flip")), "flip")
    flip_one_byte(done.path / "model.safetensors")
    with pytest.raises(Exception, match="corrupt model version"):
        tasks.validate(job((settings, factory)))
    worker = stack.device_worker("cpu.0", extra_env={"TEXTNLP_PLACEMENT": json.dumps({"*": ["flip"]})}).start()
    assert worker.process is not None
    assert worker.process.wait(180) != 0
    assert f"model 'flip' version {done.version} is corrupt and is not served" in worker.log_tail(80)


def test_an_int8_variant_asked_for_by_placement_serves_jobs_in_a_fresh_worker(
        stack: LocalStack, tiny_model: Path, tmp_path: Path) -> None:
    from textnlp_jobs.maintenance import models as tasks

    from .test_model_maintenance import job

    settings = stack.settings(quantize_min_speedup=0.0)  # tiny gains no speed; the other rules still hold
    factory = session_factory(settings)
    registry.register_directory(settings, factory, Path(shutil.copytree(tiny_model, tmp_path / "q")), "qtiny")
    with factory.begin() as session:
        registry.set_quantize_eligible(session, "qtiny", True)
    (built,) = tasks.quantize(job((settings, factory)), batches=(1,), repeats=1)["built"]
    worker = stack.device_worker("cpu.0", extra_env={"TEXTNLP_PLACEMENT": json.dumps({"*": ["qtiny@int8"]})})
    worker.start()
    client = Client(settings)
    jobs = client.submit_many([{"prompt": p, "model": "qtiny", "max_new_tokens": 6} for p in PROMPTS[:4]])
    stack.wait_ready(worker_hostname(settings, "cpu.0"), timeout=180)
    done = client.wait([j.id for j in jobs], timeout=180)
    assert [j.status for j in done] == ["succeeded"] * 4, worker.log_tail()
    assert {j.model_version for j in done} == {built["version"]}
