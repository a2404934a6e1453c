"""Bad input gets an error naming the field and the limit (pure validation, no services)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from textnlp_jobs.errors import InputError
from textnlp_jobs.settings import Settings
from textnlp_jobs.validation import validate_job

SETTINGS = Settings(max_prompt_bytes=100, max_prompt_tokens=10, max_new_tokens_limit=64, home="/tmp/unused")


def check(**spec: object) -> object:
    spec.setdefault("prompt", "hello world")
    spec.setdefault("model", "demo")
    return validate_job(spec, SETTINGS, ["demo"], lambda model, prompt: len(prompt.split()))


@pytest.mark.parametrize(
    ("spec", "field", "code", "words"),
    [
        ({"prompt": ""}, "prompt", "input.prompt_empty", "empty"),
        ({"prompt": "   \n"}, "prompt", "input.prompt_empty", "empty"),
        ({"prompt": "x" * 101}, "prompt", "input.prompt_too_long", "limit of 100 bytes"),
        ({"prompt": "a " * 11}, "prompt", "input.prompt_too_many_tokens", "limit of 10 tokens"),
        ({"prompt": b"\xff\xfe bad"}, "prompt", "input.prompt_invalid_utf8", "UTF-8"),
        ({"prompt": "bad \udc80"}, "prompt", "input.prompt_invalid_utf8", "UTF-8"),
        ({"model": "gpt-17"}, "model", "input.unknown_model", "unknown model 'gpt-17'"),
        ({"max_new_tokens": 0}, "max_new_tokens", "input.max_new_tokens_out_of_range", "[1, 64]"),
        ({"max_new_tokens": 65}, "max_new_tokens", "input.max_new_tokens_out_of_range", "[1, 64]"),
        ({"max_new_tokens": "ten"}, "max_new_tokens", "input.max_new_tokens_invalid", "integer"),
        ({"temperature": -0.1}, "temperature", "input.temperature_out_of_range", "[0.0, 2.0]"),
        ({"temperature": 2.5}, "temperature", "input.temperature_out_of_range", "2.0"),
        ({"top_p": 0}, "top_p", "input.top_p_out_of_range", "(0.0, 1.0]"),
        ({"top_p": 1.5}, "top_p", "input.top_p_out_of_range", "(0.0, 1.0]"),
        ({"priority": 10}, "priority", "input.priority_out_of_range", "[0, 9]"),
        ({"device": "tpu:0"}, "device", "input.device_invalid", "cuda.0"),
        ({"deadline": datetime.now(UTC) - timedelta(seconds=1)}, "deadline", "input.deadline_past", "past"),
        ({"deadline": datetime(2030, 1, 1)}, "deadline", "input.deadline_invalid", "timezone-aware"),
        ({"idempotency_key": "k" * 256}, "idempotency_key", "input.idempotency_key_invalid", "255"),
        ({"colour": "blue"}, "colour", "input.unknown_parameter", "not a job parameter"),
    ],
)
def test_bad_input_names_the_field_and_the_limit(spec: dict[str, object], field: str, code: str, words: str) -> None:
    with pytest.raises(InputError) as caught:
        check(**spec)
    assert caught.value.field == field
    assert caught.value.code == code
    assert words in str(caught.value)


def test_good_input_becomes_a_job_with_defaults() -> None:
    job = check(prompt=b"caf\xc3\xa9 au lait", max_new_tokens=5)
    assert job.prompt == "café au lait"
    assert job.max_new_tokens == 5
    assert job.params == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}


def test_sampled_jobs_get_a_stored_seed_so_retries_repeat_the_text() -> None:
    job = check(temperature=0.7)
    assert isinstance(job.params["seed"], int)


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinite_floats_are_refused_with_the_field_named(field: str, value: float) -> None:
    with pytest.raises(InputError) as caught:
        check(**{field: value})
    assert caught.value.field == field and "finite" in str(caught.value)


@pytest.mark.parametrize("spec", [None, "prompt", ["hello"], 3])
def test_a_job_that_is_not_a_dict_is_refused_clearly(spec: object) -> None:
    with pytest.raises(InputError) as caught:
        validate_job(spec, SETTINGS, ["demo"], lambda model, prompt: 1)  # type: ignore[arg-type]
    assert caught.value.code == "input.job_invalid" and type(spec).__name__ in str(caught.value)


def test_a_prompt_plus_new_tokens_past_the_models_positions_is_refused() -> None:
    settings = Settings(max_prompt_tokens=1024, home="/tmp/unused")
    prompt = "word " * 601
    with pytest.raises(InputError) as caught:
        validate_job({"prompt": prompt, "model": "demo"}, settings, ["demo"], lambda model, text: len(text.split()),
                     lambda model: 512)
    assert caught.value.code == "input.too_long_for_model" and "512 positions" in str(caught.value)
    fits = validate_job({"prompt": "word " * 480, "model": "demo"}, settings, ["demo"],
                        lambda model, text: len(text.split()), lambda model: 512)
    assert fits.prompt_tokens == 480


def test_a_device_is_stored_by_its_full_name_on_its_node() -> None:
    assert check(device="cuda:1").device == f"{SETTINGS.node_name}/cuda.1"
    assert check(device="other/cpu.0").device == "other/cpu.0"
