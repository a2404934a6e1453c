"""What `submit` promises: all or nothing, one job per idempotency key (and only for the same
parameters), no job accepted that can never run, and a job that exists is never reported as failed."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import redis
from sqlalchemy import func, select

from textnlp_jobs.client import Client
from textnlp_jobs.constants import GENERATE_TASK
from textnlp_jobs.db import device_workers
from textnlp_jobs.db import repository as repo
from textnlp_jobs.db.models import Generation, Prompt
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import IdempotencyConflictError, InputError
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack, scratch_postgres
from textnlp_jobs.publish import FIRST_PUBLISH_BATCH, PUBLISH_BATCH, broker_priority, pipelines, publish

from .conftest import TEST_NODE
from .test_producer_errors import messages_in_broker

pytestmark = [pytest.mark.integration]


def rows(client: Client) -> int:
    with client.sessions() as session:
        return int(session.execute(select(func.count()).select_from(Generation)).scalar_one())


def register_device(client: Client, device: str, models: list[str]) -> None:
    """What a device worker records when it starts (its heartbeat then lapses: it never ran)."""
    with client.sessions.begin() as session:
        device_workers.register(session, Device.parse(device, TEST_NODE), models, "test-instance", 15.0)
        device_workers.unregister(session, Device.parse(device, TEST_NODE), "test-instance")


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_a_nan_in_the_last_of_many_jobs_creates_nothing(stack: LocalStack) -> None:
    client = Client(stack.settings())
    specs: list[dict[str, object]] = [{"prompt": f"Return a new list {i}", "model": "demo"} for i in range(2_500)]
    specs[-1]["temperature"] = float("nan")
    with pytest.raises(InputError, match="job 2499: temperature: must be a finite number"):
        client.submit_many(specs)
    assert rows(client) == 0
    assert messages_in_broker(stack.env["TEXTNLP_BROKER_URL"]) == 0


def test_a_bulk_call_over_many_insert_batches_creates_every_job_and_one_message_each(stack: LocalStack) -> None:
    client = Client(stack.settings())
    jobs = client.submit_many([{"prompt": f"Return a new list {i}", "model": "demo"} for i in range(2_500)])
    assert len({job.id for job in jobs}) == 2_500 == rows(client)
    assert messages_in_broker(stack.env["TEXTNLP_BROKER_URL"]) == 2_500


def test_a_bulk_call_publishes_each_message_once_the_first_few_in_a_pipeline_of_their_own() -> None:
    for count in (0, 1, FIRST_PUBLISH_BATCH, FIRST_PUBLISH_BATCH + 1, 2_500):
        ranges = pipelines(count)
        assert [i for r in ranges for i in r] == list(range(count))
        assert all(len(r) <= PUBLISH_BATCH for r in ranges)
        if count:  # a worker can start on these while the next pipeline is built
            assert len(ranges[0]) == min(count, FIRST_PUBLISH_BATCH)


def test_a_published_message_is_the_one_celery_send_task_writes_but_for_its_ids(stack: LocalStack) -> None:
    """publish() builds Celery's task protocol itself (send_task was a producer's bottleneck): a
    worker of any kind, Flower and the dead-letter sweep see the same message as before."""
    client = Client(stack.settings())
    ours, celerys = uuid.uuid4(), uuid.uuid4()
    publish(client.celery, client.settings, [repo.Routing(ours, "demo", None, 7)])
    with client.celery.producer_or_acquire() as producer:
        client.celery.send_task(GENERATE_TASK, args=[str(celerys)], task_id=str(celerys), queue="textnlp.gen.demo",
                                priority=broker_priority(7), producer=producer, argsrepr=f"['{celerys}']",
                                kwargsrepr="{}")
    broker = redis.Redis.from_url(stack.env["TEXTNLP_BROKER_URL"])
    try:
        raw = [json.loads(m) for key in broker.scan_iter(match="textnlp.gen.demo*", _type="list")
               for m in broker.lrange(key, 0, -1)]
    finally:
        broker.close()

    def without_ids(message: dict[str, Any]) -> dict[str, Any]:
        job_id = message["headers"]["id"]
        message["body"] = json.loads(base64.b64decode(message["body"]))
        message["properties"].pop("delivery_tag")  # kombu's, unique per message
        return cast(dict[str, Any], json.loads(json.dumps(message).replace(job_id, "ID")))

    by_id = {m["headers"]["id"]: m for m in raw}
    assert set(by_id) == {str(ours), str(celerys)}
    assert without_ids(by_id[str(ours)]) == without_ids(by_id[str(celerys)])
    assert by_id[str(ours)]["body"] == [[str(ours)], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                          "chord": None}]


def test_every_field_of_a_bulk_call_is_stored_as_submitted(stack: LocalStack) -> None:
    client = Client(stack.settings())
    register_device(client, "cpu.0", ["demo"])
    deadline = datetime.now(UTC) + timedelta(hours=2)
    specs: list[dict[str, object]] = [
        {"prompt": "Return a new list", "model": "demo"},
        {"prompt": "naïve café — 東京 🚀 \"quoted\" back\\slash\n{json: [1]}", "model": "demo", "max_new_tokens": 7,
         "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11, "priority": 9, "max_attempts": 5,
         "idempotency_key": "bulk-1", "deadline": deadline, "device": "cpu.0"},
        {"prompt": "Raise an exception if", "model": "tiny", "temperature": 0.5},  # a drawn seed is stored
    ]
    returned = client.submit_many(specs)
    assert [client.get(job.id) for job in returned] == returned
    with client.sessions() as session:
        stored = session.execute(
            select(Prompt.text, Prompt.sha256, Prompt.byte_length, Prompt.token_count, Generation.prompt_tokens)
            .join(Generation, Generation.prompt_id == Prompt.id).where(Generation.id.in_([j.id for j in returned]))
            .order_by(Generation.priority, Generation.model)
        ).all()
    for spec, (text, sha256, byte_length, token_count, prompt_tokens) in zip(
            [specs[0], specs[2], specs[1]], stored, strict=True):
        raw = str(spec["prompt"]).encode("utf-8")
        assert (text, sha256, byte_length) == (spec["prompt"], hashlib.sha256(raw).hexdigest(), len(raw))
        # counted together, as one by one
        assert token_count == prompt_tokens == client._count_tokens(str(spec["model"]), str(spec["prompt"]))
    pinned = returned[1]
    assert (pinned.priority, pinned.max_attempts, pinned.idempotency_key, pinned.device, pinned.deadline) == (
        9, 5, "bulk-1", f"{TEST_NODE}/cpu.0", deadline)
    assert pinned.params == {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11}
    assert returned[2].params["seed"] is not None and returned[0].params["seed"] is None


def test_one_key_three_times_in_one_call_is_one_row_and_one_message(stack: LocalStack) -> None:
    client = Client(stack.settings())
    spec = {"prompt": "Return a new list", "model": "demo", "idempotency_key": "order-42"}
    jobs = client.submit_many([spec, dict(spec), dict(spec)])
    assert len({job.id for job in jobs}) == 1 and rows(client) == 1
    assert messages_in_broker(stack.env["TEXTNLP_BROKER_URL"]) == 1


@pytest.mark.parametrize("bad", [None, "Return a new list", ["prompt"]])
def test_a_job_that_is_not_a_dict_is_refused_by_its_index(stack: LocalStack, bad: object) -> None:
    client = Client(stack.settings())
    with pytest.raises(InputError, match="job 1: job: must be a dict"):
        client.submit_many([{"prompt": "Return a new list", "model": "demo"}, bad])  # type: ignore[list-item]
    assert rows(client) == 0


def test_a_key_reused_with_other_parameters_is_a_conflict_naming_what_differs(stack: LocalStack) -> None:
    client = Client(stack.settings())
    first = client.submit("Return a new list", model="demo", idempotency_key="order-7", max_new_tokens=8)
    assert client.submit("Return a new list", model="demo", idempotency_key="order-7", max_new_tokens=8).id == first.id
    with pytest.raises(IdempotencyConflictError) as caught:
        client.submit("Return a new list", model="demo", idempotency_key="order-7", max_new_tokens=9)
    assert caught.value.code == "input.idempotency_conflict" and "max_new_tokens" in str(caught.value)
    with pytest.raises(IdempotencyConflictError, match="prompt"):
        client.submit("Another prompt", model="demo", idempotency_key="order-7", max_new_tokens=8)
    # A sampled job's drawn seed is not something the caller chose: resubmitting without one matches.
    sampled = client.submit("Return a new list", model="demo", idempotency_key="order-8", temperature=0.7)
    assert client.submit("Return a new list", model="demo", idempotency_key="order-8", temperature=0.7).id == sampled.id
    assert rows(client) == 2


@pytest.mark.parametrize("device", ["cuda.99", "cpu.7", "othernode/cuda.0"])
def test_a_job_pinned_to_a_device_no_worker_serves_is_refused_with_the_known_ones(stack: LocalStack,
                                                                                   device: str) -> None:
    client = Client(stack.settings())
    register_device(client, "cpu.0", ["demo"])
    with pytest.raises(InputError) as caught:
        client.submit("Return a new list", model="demo", device=device)
    assert caught.value.code == "input.unknown_device" and f"{TEST_NODE}/cpu.0" in str(caught.value)
    with pytest.raises(InputError) as malformed:
        client.submit("Return a new list", model="demo", device="../cuda.0")
    assert malformed.value.code == "input.device_invalid"
    with pytest.raises(InputError) as other_model:
        client.submit("Return a new list", model="tiny", device="cpu.0")
    assert other_model.value.code == "input.model_not_on_device"
    assert client.submit("Return a new list", model="demo", device="cpu.0").device == f"{TEST_NODE}/cpu.0"
    assert rows(client) == 1


def test_a_prompt_longer_than_the_model_can_attend_to_is_refused_at_submit(stack: LocalStack) -> None:
    client = Client(stack.settings())
    prompt = " ".join(["list"] * 601)
    tokens = client._count_tokens("demo", prompt)
    assert tokens is not None and 512 - 32 < tokens <= stack.settings().max_prompt_tokens
    with pytest.raises(InputError) as caught:
        client.submit(prompt, model="demo")
    assert caught.value.code == "input.too_long_for_model" and "512 positions" in str(caught.value)
    assert rows(client) == 0


def test_submit_while_the_broker_is_down_returns_the_job_and_the_cli_exits_3(stack: LocalStack) -> None:
    settings = stack.settings(broker_url="redis://127.0.0.1:1/0")
    client = Client(settings)
    unpublished: list[int] = []
    job = client.submit_many([{"prompt": "Return a new list", "model": "demo"}],
                             on_unpublished=lambda count, _error: unpublished.append(count))[0]
    assert unpublished == [1]
    assert client.get(job.id).status == "queued"

    done = cli(stack.process_env({"TEXTNLP_BROKER_URL": "redis://127.0.0.1:1/0"}), "submit", "Create a new thread")
    assert done.returncode == 3, done.stdout + done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert client.get(job_id).status == "queued"
    assert done.stderr.strip().count("\n") == 0 and "broker.unreachable" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_submit_while_postgresql_is_down_is_one_line_naming_the_host(stack: LocalStack) -> None:
    env = stack.process_env({"TEXTNLP_DATABASE_URL": "postgresql+psycopg://app:hunter2-secret@127.0.0.1:1/textnlp"})
    done = cli(env, "submit", "Return a new list")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output
    assert "ledger.unreachable" in output and "127.0.0.1:1/textnlp" in output and "hunter2" not in output


def test_check_and_every_command_on_an_unmigrated_database_say_to_run_db_upgrade(stack: LocalStack) -> None:
    with scratch_postgres() as empty_url:
        env = stack.process_env({"TEXTNLP_DATABASE_URL": empty_url})
        check = cli(env, "check")
        assert check.returncode == 1 and "ledger: FAILED" in check.stdout and "db upgrade" in check.stdout
        for args in (["submit", "Return a new list"], ["status", "00000000-0000-0000-0000-000000000000"],
                     ["jobs", "list"]):
            done = cli(env, *args)
            output = done.stdout + done.stderr
            assert done.returncode == 2 and "ledger.not_migrated" in output and "db upgrade" in output, (args, output)
            assert "Traceback" not in output

