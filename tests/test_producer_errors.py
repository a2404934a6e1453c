"""Bad input through the real producer path leaves 0 rows and 0 messages."""

from __future__ import annotations

import pytest
import redis

from textnlp_jobs.client import Client
from textnlp_jobs.errors import InputError, JobNotFoundError
from textnlp_jobs.local_stack import LocalStack

pytestmark = [pytest.mark.integration]

BAD = [
    ({"prompt": ""}, "input.prompt_empty"),
    ({"prompt": "word " * 5000}, "input.prompt_too_long"),
    ({"prompt": "word " * 1500}, "input.prompt_too_many_tokens"),
    ({"prompt": b"\xc3\x28 invalid"}, "input.prompt_invalid_utf8"),
    ({"model": "no-such-model"}, "input.unknown_model"),
    ({"max_new_tokens": 10_000}, "input.max_new_tokens_out_of_range"),
    ({"temperature": 9.0}, "input.temperature_out_of_range"),
    ({"top_p": 0.0}, "input.top_p_out_of_range"),
]


def messages_in_broker(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(client.llen(key) for key in client.scan_iter(match="textnlp.*", _type="list"))
    finally:
        client.close()


@pytest.mark.parametrize(("override", "code"), BAD)
def test_each_bad_input_returns_its_error_and_creates_nothing(stack: LocalStack, override: dict, code: str) -> None:
    client = Client(stack.settings())
    spec = {"prompt": "Return a new list", "model": "demo", **override}
    with pytest.raises(InputError) as caught:
        client.submit(**{k: v for k, v in spec.items() if k != "prompt"}, prompt=spec["prompt"])
    assert caught.value.code == code
    assert client.list(limit=5) == []
    assert messages_in_broker(stack.env["TEXTNLP_BROKER_URL"]) == 0


def test_one_bad_job_in_a_bulk_submit_rejects_the_whole_call(stack: LocalStack) -> None:
    client = Client(stack.settings())
    specs = [{"prompt": f"good {i}", "model": "demo"} for i in range(5)] + [{"prompt": "", "model": "demo"}]
    with pytest.raises(InputError, match="job 5: prompt: is empty"):
        client.submit_many(specs)
    assert client.list(limit=10) == []
    assert messages_in_broker(stack.env["TEXTNLP_BROKER_URL"]) == 0


def test_reading_an_unknown_job_says_so(stack: LocalStack) -> None:
    client = Client(stack.settings())
    with pytest.raises(JobNotFoundError):
        client.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(InputError, match="is not a job id"):
        client.get("not-a-uuid")
