"""Checks every job before anything is written: a bad job gets an error naming the field and
the limit, and creates no row and no message."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any

from textnlp_jobs.db.repository import NewJob
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import ErrorCode, InputError, UnknownModelError
from textnlp_jobs.settings import Settings

_MAX_SEED = 2**63 - 1

TokenCounter = Callable[[str, str], int | None]  # (model, prompt) -> tokens, None if unknown here
ChatCheck = Callable[[str], bool | None]  # model -> has a chat template, None if unknown here
_MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARACTERS = 64


def _stop_strings(value: Any) -> list[str]:
    """A job's stop strings: its text ends before the first of them the model writes. A single
    string is taken as a list of one; none (the default) is an empty list."""
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if (not isinstance(stops, list | tuple) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARACTERS for s in stops)):
        raise InputError("stop", f"must be up to {MAX_STOP_STRINGS} non-empty strings of at most "
                                 f"{MAX_STOP_CHARACTERS} characters each", code=ErrorCode.INPUT_STOP_INVALID)
    if any("\x00" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in stops):
        raise InputError("stop", "must be valid text (no NUL, no lone surrogate)", code=ErrorCode.INPUT_STOP_INVALID)
    return list(dict.fromkeys(stops))


def _messages_text(messages: Any, settings: Settings) -> str:
    """A chat as the prompt the ledger stores: canonical JSON of ``[{role, content}, ...]``; the
    worker applies the model's chat template to it."""
    import json

    if not isinstance(messages, list) or not messages or len(messages) > _MAX_MESSAGES:
        raise InputError("messages", f"must be a list of 1 to {_MAX_MESSAGES} messages",
                         code=ErrorCode.INPUT_MESSAGES_INVALID)
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or set(message) != {"role", "content"}
                or not isinstance(message["role"], str) or not 1 <= len(message["role"]) <= 32
                or not isinstance(message["content"], str)):
            raise InputError("messages", f"message {index} must be {{'role': str, 'content': str}}",
                             code=ErrorCode.INPUT_MESSAGES_INVALID)
    if not any(m["content"].strip() for m in messages):
        raise InputError("messages", "have no content", code=ErrorCode.INPUT_PROMPT_EMPTY)
    text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))
    return _prompt_text(text, settings)
PositionLimit = Callable[[str], int | None]  # model -> its maximum sequence length, None if unknown


def _number(field: str, value: Any, kind: type, low: float, high: float, *, low_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise InputError(field, f"must be {'a number' if kind is float else 'an integer'}, got {value!r}",
                         code=ErrorCode(f"input.{field}_invalid"))
    if isinstance(value, float) and not math.isfinite(value):
        # Every comparison with NaN is false: without this, NaN would pass the range check.
        raise InputError(field, f"must be a finite number, got {value!r}", code=ErrorCode(f"input.{field}_invalid"))
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise InputError(field, f"{value} is outside the allowed range {bracket}{low}, {high}]",
                         code=ErrorCode(f"input.{field}_out_of_range"))
    return kind(value)


def _prompt_text(prompt: Any, settings: Settings) -> str:
    if isinstance(prompt, bytes | bytearray):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError("prompt", f"is not valid UTF-8 (bad byte at offset {error.start})",
                             code=ErrorCode.INPUT_PROMPT_INVALID_UTF8) from None
    if not isinstance(prompt, str):
        raise InputError("prompt", f"must be text, got {type(prompt).__name__}", code=ErrorCode.INPUT_PROMPT_INVALID)
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError as error:  # lone surrogates from a bad decode upstream
        raise InputError("prompt", f"is not valid UTF-8 (unpaired surrogate at character {error.start})",
                         code=ErrorCode.INPUT_PROMPT_INVALID_UTF8) from None
    if not prompt.strip():
        raise InputError("prompt", "is empty", code=ErrorCode.INPUT_PROMPT_EMPTY)
    if "\x00" in prompt:
        raise InputError("prompt", "contains a NUL character", code=ErrorCode.INPUT_PROMPT_INVALID)
    if size > settings.max_prompt_bytes:
        raise InputError("prompt", f"is {size} bytes, over the limit of {settings.max_prompt_bytes} bytes",
                         code=ErrorCode.INPUT_PROMPT_TOO_LONG)
    return prompt


def validate_job(
    spec: dict[str, Any], settings: Settings, known_models: Collection[str], count_tokens: TokenCounter,
    max_positions: PositionLimit | None = None, has_chat_template: ChatCheck | None = None,
) -> NewJob:
    """Turn one job's keyword arguments into a ``NewJob`` or raise ``InputError``. A job gives either
    a ``prompt`` or chat ``messages`` (for a model whose tokenizer has a chat template). The device
    is checked for form here and returned as its full name (``node/cuda.0``); whether it exists is
    the caller's check, against the device registry."""
    if not isinstance(spec, dict):
        raise InputError("job", f"must be a dict of job parameters, got {type(spec).__name__}",
                         code=ErrorCode.INPUT_JOB_INVALID)
    allowed = {"prompt", "messages", "model", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "priority",
               "idempotency_key", "deadline", "device", "max_attempts", "stop"}
    unknown = set(spec) - allowed
    if unknown:
        raise InputError(sorted(unknown)[0], "is not a job parameter", code=ErrorCode.INPUT_UNKNOWN_PARAMETER)
    chat = spec.get("messages") is not None
    if chat and spec.get("prompt") is not None:
        raise InputError("messages", "cannot be given with a prompt; give one or the other",
                         code=ErrorCode.INPUT_MESSAGES_INVALID)
    prompt = _messages_text(spec["messages"], settings) if chat else _prompt_text(spec.get("prompt"), settings)
    model = spec.get("model")
    if not isinstance(model, str) or model not in known_models:
        raise UnknownModelError(str(model), list(known_models))
    if chat and has_chat_template is not None and has_chat_template(model) is False:
        raise InputError("messages", f"model {model!r} has no chat template; send a plain prompt instead "
                         "(no messages, no --chat)",
                         code=ErrorCode.INPUT_NO_CHAT_TEMPLATE)
    prompt_tokens = None if chat else count_tokens(model, prompt)  # the template adds tokens: the worker counts
    if prompt_tokens is not None and prompt_tokens > settings.max_prompt_tokens:
        raise InputError("prompt", f"is {prompt_tokens} tokens, over the limit of {settings.max_prompt_tokens} tokens",
                         code=ErrorCode.INPUT_PROMPT_TOO_MANY_TOKENS)

    max_new_tokens = _number("max_new_tokens", spec.get("max_new_tokens", settings.default_max_new_tokens),
                             int, 1, settings.max_new_tokens_limit)
    temperature = _number("temperature", spec.get("temperature", 0.0), float, 0.0, settings.max_temperature)
    top_p = _number("top_p", spec.get("top_p", 1.0), float, 0.0, 1.0, low_open=True)
    top_k = _number("top_k", spec.get("top_k", 0), int, 0, 1_000_000)
    stop = _stop_strings(spec.get("stop"))
    positions = max_positions(model) if max_positions is not None else None
    if positions is not None and prompt_tokens is not None and prompt_tokens + max_new_tokens > positions:
        raise InputError("prompt", f"is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that is "
                         f"{prompt_tokens + max_new_tokens}, over the {positions} positions model {model!r} can "
                         "attend to", code=ErrorCode.INPUT_TOO_LONG_FOR_MODEL)
    seed = spec.get("seed")
    seed_explicit = seed is not None
    if seed is not None:
        seed = _number("seed", seed, int, 0, _MAX_SEED)
    elif temperature > 0:
        seed = random.SystemRandom().randrange(2**31)  # stored, so every retry draws the same text
    priority = _number("priority", spec.get("priority", 0), int, 0, settings.max_priority)
    max_attempts = _number("max_attempts", spec.get("max_attempts", settings.default_max_attempts), int, 1, 20)

    key = spec.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 255):
        raise InputError("idempotency_key", "must be text of 1 to 255 characters",
                         code=ErrorCode.INPUT_IDEMPOTENCY_KEY_INVALID)
    deadline = spec.get("deadline")
    if deadline is not None:
        if not isinstance(deadline, datetime) or deadline.tzinfo is None:
            raise InputError("deadline", "must be a timezone-aware datetime", code=ErrorCode.INPUT_DEADLINE_INVALID)
        if deadline <= datetime.now(UTC):
            raise InputError("deadline", f"{deadline.isoformat()} is already past", code=ErrorCode.INPUT_DEADLINE_PAST)
    device = spec.get("device")
    if device is not None:
        device = Device.parse(device, settings.node_name).name

    params: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    if chat:
        params["chat"] = True
    if stop:  # absent when none, so a job without stop strings keeps the fingerprint it always had
        params["stop"] = stop
    return NewJob(prompt=prompt, model=model, max_new_tokens=max_new_tokens, params=params, priority=priority,
                  max_attempts=max_attempts, idempotency_key=key, deadline=deadline, device=device,
                  prompt_tokens=prompt_tokens, seed_explicit=seed_explicit)
