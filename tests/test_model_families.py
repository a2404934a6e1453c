"""The families people run serve jobs through a real worker, batched, with the same greedy text
as each job alone: Llama-style, Qwen2-style, a tokenizer with no pad token, and a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.errors import InputError
from textnlp_jobs.inference import registry
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.worker_main import worker_hostname

from .helpers import PROMPTS
from .model_families import build_family, with_chat_template, without_pad_token

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILIES = ("fam-llama", "fam-qwen2", "fam-nopad", "fam-chat")
# Four models on a busy 2-core machine: give a batch time before the job counts as timed out.
SLOW_MACHINE = {"TEXTNLP_MAX_JOB_SECONDS": "90", "TEXTNLP_LEASE_SECONDS": "120", "TEXTNLP_VISIBILITY_TIMEOUT": "150"}


@pytest.fixture(scope="module")
def family_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    llama = build_family("llama", tiny_model, root / "llama")
    return {
        "fam-llama": llama,
        "fam-qwen2": build_family("qwen2", tiny_model, root / "qwen2"),
        "fam-nopad": without_pad_token(llama, root / "llama-nopad"),  # Llama tokenizers often have none
        "fam-chat": with_chat_template(tiny_model, root / "chat"),
    }


def alone(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = TransformersEngine("alone", "v", path)
    return [engine.generate([EngineRequest(ids, new_tokens, SamplingParams())])[0].token_ids for ids in prompts]


def test_llama_qwen2_and_no_pad_token_models_serve_batched_jobs_with_the_greedy_text_of_each_alone(
        stack: LocalStack, family_dirs: dict[str, Path]) -> None:
    settings = stack.settings()
    factory = session_factory(settings)
    for name, path in family_dirs.items():
        registry.register_directory(settings, factory, path, name, in_place=True)
    with factory() as session:
        nopad = registry.get_version(session, "fam-nopad", registry.resolve(session, "fam-nopad").version)[1]
        assert nopad.special_tokens["pad_token"] is None and nopad.architecture == "LlamaForCausalLM"
    placement = {"cpu.0": list(FAMILIES)}
    env = {**SLOW_MACHINE, "TEXTNLP_PLACEMENT": json.dumps(placement)}
    worker = stack.device_worker("cpu.0", extra_env=env).start()
    client = Client(settings)
    stack.wait_ready(worker_hostname(settings, "cpu.0"), timeout=240)
    prompts = PROMPTS[:6]
    jobs = {name: client.submit_many([{"prompt": p, "model": name, "max_new_tokens": 10} for p in prompts])
            for name in FAMILIES[:3]}
    chat = [client.submit(messages=[{"role": "user", "content": p}], model="fam-chat", max_new_tokens=10)
            for p in prompts[:3]]
    done = {name: client.wait([j.id for j in batch], timeout=240) for name, batch in jobs.items()}
    chat_done = client.wait([j.id for j in chat], timeout=240)
    for name, results in done.items():
        assert [j.status for j in results] == ["succeeded"] * len(prompts), worker.log_tail()
        assert max(j.batch_size or 0 for j in results) > 1, name  # they rode together
        engine = TransformersEngine(name, "v", family_dirs[name])
        assert engine.tokenize_many(prompts) == [engine.tokenize(p) for p in prompts], name  # the worker's way
        expected = alone(family_dirs[name], [engine.tokenize(p) for p in prompts], 10)
        assert [j.text for j in results] == [decoded(engine, ids) for ids in expected], name
        assert {j.model_version for j in results} == {family_dirs_version(settings, name)}
    chat_engine = TransformersEngine("fam-chat", "v", family_dirs["fam-chat"])
    expected_chat = alone(family_dirs["fam-chat"],
                          [chat_engine.tokenize_chat([{"role": "user", "content": p}]) for p in prompts[:3]], 10)
    assert [j.status for j in chat_done] == ["succeeded"] * 3, worker.log_tail()
    assert [j.text for j in chat_done] == [decoded(chat_engine, ids) for ids in expected_chat]
    # The producer cannot count a chat job's tokens (the template adds some): the worker records them.
    assert [j.prompt_tokens for j in chat_done] == [
        len(chat_engine.tokenize_chat([{"role": "user", "content": p}])) for p in prompts[:3]]


def decoded(engine: TransformersEngine, ids: list[int]) -> str:
    return str(engine.tokenizer.decode(ids, skip_special_tokens=True)).replace("\x00", "\ufffd")


def family_dirs_version(settings: object, name: str) -> str:
    with session_factory(settings)() as session:  # type: ignore[arg-type]
        return registry.resolve(session, name).version


def test_messages_are_refused_for_a_model_without_a_chat_template(stack: LocalStack) -> None:
    client = Client(stack.settings())
    with pytest.raises(InputError, match="has no chat template") as refused:
        client.submit(messages=[{"role": "user", "content": "hello"}], model="demo")
    assert refused.value.code == "input.no_chat_template"
    with pytest.raises(InputError, match="cannot be given with a prompt"):
        client.submit("hello", messages=[{"role": "user", "content": "hello"}], model="demo")


@pytest.fixture(scope="module")
def static_only_dirs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static-only")
    return {family: build_family(family, tiny_model, root / family) for family in ("mamba",)}


def test_a_state_space_model_serves_in_static_batches_with_the_greedy_text_of_each_alone(
        stack: LocalStack, static_only_dirs: dict[str, Path]) -> None:
    settings = stack.settings()
    factory = session_factory(settings)
    done = registry.register_directory(settings, factory, static_only_dirs["mamba"], "fam-mamba", in_place=True)
    assert done.static_only_reason is not None  # `models register` prints it as a note
    env = {**SLOW_MACHINE, "TEXTNLP_PLACEMENT": json.dumps({"cpu.0": ["fam-mamba"]}),
           "TEXTNLP_BATCHING": json.dumps({"*": {"mode": "continuous", "max_batch": 8}})}
    worker = stack.device_worker("cpu.0", extra_env=env).start()
    stack.wait_ready(worker_hostname(settings, "cpu.0"), timeout=240)
    client = Client(settings)
    prompts = PROMPTS[:6]
    jobs = client.submit_many([{"prompt": p, "model": "fam-mamba", "max_new_tokens": 5 + i}
                               for i, p in enumerate(prompts)])
    results = client.wait([j.id for j in jobs], timeout=240)
    assert [j.status for j in results] == ["succeeded"] * len(prompts), worker.log_tail()
    assert "reason=static_only_models" in worker.log_tail(400)
    engine = TransformersEngine("fam-mamba", "v", static_only_dirs["mamba"])
    for i, (prompt, job) in enumerate(zip(prompts, results, strict=True)):
        expected = engine.generate([EngineRequest(engine.tokenize(prompt), 5 + i, SamplingParams())])[0].token_ids
        assert job.text == decoded(engine, expected)
