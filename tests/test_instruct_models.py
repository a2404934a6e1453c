"""What the instruct models people bring carry, and what a job gets from each:

- a tokenizer that begins every sequence with BOS (Llama, Gemma): a plain prompt gets it, as the
  model was trained, and the client counts it; a chat template writes its own, so it is not doubled;
- an end-of-turn token that only generation_config.json lists among its end-of-sequence ids: a
  reply ends there, in static and continuous batches alike;
- decoding defaults in generation_config.json (``temperature``, ``repetition_penalty``...): a job
  decodes with its own settings alone, in either batching mode, and ``models register`` says so.

The model is a tiny random Llama (``model_families.instruct_llama``); so that it really ends a
turn, one token its greedy reply would emit is swapped with the end-of-turn token in its output
layer (the reply up to there is unchanged, and then it says end-of-turn instead).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.session import dispose_engines, session_factory
from textnlp_jobs.inference import registry
from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.settings import BatchingPolicy, Settings

from .helpers import PROMPTS
from .model_families import BOS, END_OF_TURN, instruct_llama
from .test_model_registry import cli

QUESTION = [{"role": "user", "content": "Return a new list of the values"}]
# What instruct models' generation_config.json files commonly set; none of it may change a job.
DECODING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.5,
                     "no_repeat_ngram_size": 2, "min_new_tokens": 12}


def set_generation_config(path: Path, **values: Any) -> None:
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, **values}))


@pytest.fixture(scope="module")
def instruct(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``plain``: the model with one end-of-sequence id; ``turns``: the same, ending its reply to
    QUESTION with END_OF_TURN, which generation_config.json lists; ``defaults``: ``turns`` with
    DECODING_DEFAULTS too. ``reply``: the greedy reply to QUESTION up to where it now ends."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("instruct")
    plain = instruct_llama(tiny_model, root / "plain")
    engine = TransformersEngine("plain", "v", plain)
    question = engine.tokenize_chat(QUESTION)
    before = engine.generate([EngineRequest(question, 24, SamplingParams())])[0].token_ids
    end_of_turn = int(engine.tokenizer.convert_tokens_to_ids(END_OF_TURN))
    # The first token from the third on that the reply has not said before: swapped with
    # END_OF_TURN, the reply is unchanged up to it and says END_OF_TURN there instead.
    at = next(i for i in range(2, len(before)) if before[i] not in before[:i])
    assert end_of_turn not in before

    turns = Path(shutil.copytree(plain, root / "turns"))
    weights = load_file(turns / "model.safetensors")
    head = weights["lm_head.weight"]
    head[[before[at], end_of_turn]] = head[[end_of_turn, before[at]]].clone()
    save_file(weights, turns / "model.safetensors", metadata={"format": "pt"})
    set_generation_config(turns, eos_token_id=[engine.eos_id, end_of_turn])
    defaults = Path(shutil.copytree(turns, root / "defaults"))
    set_generation_config(defaults, **DECODING_DEFAULTS)
    assert torch.equal(load_file(defaults / "model.safetensors")["lm_head.weight"], head)
    return {"plain": plain, "turns": turns, "defaults": defaults, "reply": before[:at], "end_of_turn": end_of_turn}


def test_a_plain_prompt_begins_with_the_tokenizers_bos_a_chat_prompt_with_the_templates_only(
        instruct: dict[str, Any], tmp_path: Path) -> None:
    engine = TransformersEngine("plain", "v", instruct["plain"])
    bos = engine.tokenizer.convert_tokens_to_ids(BOS)
    words = engine.tokenizer.encode("Return a new list", add_special_tokens=False)
    assert engine.tokenize("Return a new list") == [bos, *words]
    assert engine._plain_backend() is not None  # the worker's fast path adds it the same way
    assert engine.tokenize_many(PROMPTS) == [engine.tokenize(prompt) for prompt in PROMPTS]
    chat = engine.tokenize_chat(QUESTION)
    assert chat[0] == bos and chat.count(bos) == 1  # the template's own BOS, not a second one

    settings = Settings(home=tmp_path / "home", model_store=tmp_path / "store")
    upgrade(settings.database_url_value())
    try:
        registry.register_directory(settings, session_factory(settings), instruct["plain"], "instruct",
                                    in_place=True)
        client = Client(settings)
        # The client's limit check counts what the worker will feed the model.
        assert [client._count_tokens("instruct", p) for p in PROMPTS] == [len(engine.tokenize(p)) for p in PROMPTS]
        together = client._counted_together([{"prompt": p, "model": "instruct"} for p in PROMPTS])
        assert [together("instruct", p) for p in PROMPTS] == [len(engine.tokenize(p)) for p in PROMPTS]
    finally:
        dispose_engines()


def requests_for(engine: TransformersEngine) -> list[EngineRequest]:
    """The question and plain prompts, greedy and seeded-sampled, of several lengths."""
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95)
    asks = [EngineRequest(engine.tokenize_chat(QUESTION), 24, greedy)]
    asks += [EngineRequest(engine.tokenize(prompt), 6 + 3 * i, greedy) for i, prompt in enumerate(PROMPTS[:5])]
    asks += [EngineRequest(engine.tokenize(prompt), 16, sampled, seed=40 + i) for i, prompt in enumerate(PROMPTS[5:])]
    return asks


def continuously(engine: TransformersEngine, requests: list[EngineRequest]) -> list[list[int]]:
    batcher = ContinuousBatcher({"m": engine}, lambda _: BatchingPolicy(max_batch=4, max_wait_ms=1,
                                                                        mode="continuous"))
    batcher.start()
    try:
        futures = [batcher.submit(i, "m", request) for i, request in enumerate(requests)]
        return [future.result(timeout=120).result.token_ids for future in futures]
    finally:
        batcher.stop()


def test_a_reply_ends_at_any_end_of_sequence_id_generation_config_lists_in_either_batching_mode(
        instruct: dict[str, Any]) -> None:
    engine = TransformersEngine("turns", "v", instruct["turns"])
    assert engine.stop_ids == (engine.eos_id, instruct["end_of_turn"])
    requests = requests_for(engine)
    alone = [engine.generate([request])[0] for request in requests]
    assert alone[0].token_ids == instruct["reply"]  # ended at the end of its turn, which is not in it
    assert len(alone[0].logprobs) == len(instruct["reply"])
    assert [r.token_ids for r in engine.generate(requests)] == [r.token_ids for r in alone]
    assert continuously(engine, requests) == [r.token_ids for r in alone]

    # Without the end-of-turn id listed, the same model talks on past it.
    unlisted = TransformersEngine("turns", "v", instruct["turns"])
    unlisted.stop_ids = (unlisted.eos_id,)
    longer = unlisted.generate([requests[0]])[0].token_ids
    assert longer[:len(instruct["reply"]) + 1] == [*instruct["reply"], instruct["end_of_turn"]]


def test_the_models_own_decoding_defaults_change_no_job_in_either_batching_mode(instruct: dict[str, Any]) -> None:
    expected = TransformersEngine("turns", "v", instruct["turns"])
    engine = TransformersEngine("defaults", "v", instruct["defaults"])
    requests = requests_for(engine)
    assert requests == requests_for(expected)
    alone = [expected.generate([request])[0].token_ids for request in requests]
    assert [engine.generate([request])[0].token_ids for request in requests] == alone
    assert [r.token_ids for r in engine.generate(requests)] == alone
    assert continuously(engine, requests) == alone


@pytest.mark.slow
def test_models_register_notes_the_decoding_defaults_jobs_do_not_follow_and_records_the_stop_ids(
        instruct: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    registered = cli(home, "models", "register", str(instruct["defaults"]), "--name", "chatty")
    assert registered.returncode == 0, registered.stderr
    note = next(line for line in registered.stderr.splitlines() if line.startswith("note: chatty's"))
    for key, value in DECODING_DEFAULTS.items():
        assert f"{key}={value}" in note
    assert "eos_token_id" not in note  # honoured, so not a note
    shown = json.loads(cli(home, "models", "show", "chatty", "--json").stdout)
    engine = TransformersEngine("defaults", "v", instruct["defaults"])
    assert shown["versions"][0]["special_tokens"]["stop_token_ids"] == list(engine.stop_ids)
    plain = cli(home, "models", "register", str(instruct["plain"]), "--name", "quiet")
    assert plain.returncode == 0 and "generation_config.json sets" not in plain.stderr
