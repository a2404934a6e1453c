"""Stop strings: a job's text ends before the first of its stop strings the model writes, and the
row leaves the batch at that token. Static and continuous batches end a row at the same token;
the expectation here is computed independently, by decoding every prefix of the job's text run
alone without stops."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.errors import InputError
from textnlp_jobs.inference import registry
from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.settings import BatchingPolicy, Settings
from textnlp_jobs.validation import validate_job
from workers.device import worker_hostname

from .helpers import PROMPTS

SETTINGS = Settings(home="/tmp/unused")


def validated(stop: object) -> dict[str, object]:
    return validate_job({"prompt": "Return a new list", "model": "demo", "stop": stop}, SETTINGS, ["demo"],
                        lambda model, prompt: 4).params


@pytest.mark.parametrize("stop", [5, [""], ["x" * 65], ["a", "b", "c", "d", "e"], [1], {"s": 1}, ["a\x00"]])
def test_a_bad_stop_is_refused_naming_the_field_and_the_limit(stop: object) -> None:
    with pytest.raises(InputError) as refused:
        validated(stop)
    assert refused.value.field == "stop" and refused.value.code == "input.stop_invalid"


def test_stop_takes_one_string_or_a_list_and_is_absent_when_not_given() -> None:
    assert validated("\n\n")["stop"] == ["\n\n"]
    assert validated(["###", "\n", "###"])["stop"] == ["###", "\n"]  # each once, in order
    assert "stop" not in validated(None) and "stop" not in validated([])  # the fingerprint it always had


def expected(engine: TransformersEngine, tokens: list[int], logprobs: list[float],
             stops: tuple[str, ...]) -> tuple[str, list[int], int]:
    """The oracle: the shortest prefix whose whole text holds a stop, and that text cut before it."""
    for count in range(1, len(tokens) + 1):
        text = engine.tokenizer.decode(tokens[:count], skip_special_tokens=True)
        hits = [text.find(stop) for stop in stops if stop in text]
        if hits:
            return text[:min(hits)], tokens[:count], len(logprobs[:count])
    return engine.tokenizer.decode(tokens, skip_special_tokens=True), tokens, len(logprobs)


def test_static_and_continuous_batches_end_each_job_at_its_first_stop_string(tiny_model: Path) -> None:
    engine = TransformersEngine("tiny", "v", tiny_model)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.9)
    plain = [EngineRequest(engine.tokenize(p), 24, greedy if i % 3 else sampled, seed=i)
             for i, p in enumerate(PROMPTS)]
    alone = [engine.generate([request])[0] for request in plain]
    requests, oracle = [], []
    for i, (request, result) in enumerate(zip(plain, alone, strict=True)):
        text = result.text
        # Stops picked from the job's own text: a middle stretch, two (the earlier one wins), one it
        # never writes (unchanged), none.
        stops = [(text[len(text) // 2:len(text) // 2 + 3],), (text[-4:], text[3:5]), ("@@never@@",), ()][i % 4]
        stops = tuple(stop for stop in stops if stop.strip())
        requests.append(EngineRequest(request.prompt_ids, 24, request.sampling, request.seed, stops))
        oracle.append(expected(engine, result.token_ids, result.logprobs, stops) if stops
                      else (result.text, result.token_ids, len(result.logprobs)))
    assert sum(len(o[1]) < len(a.token_ids) for o, a in zip(oracle, alone, strict=True)) >= 3  # stops that bite

    static = engine.generate(requests)
    batcher = ContinuousBatcher({"m": engine}, lambda _: BatchingPolicy(max_batch=4, max_wait_ms=1,
                                                                        mode="continuous"))
    batcher.start()
    try:
        futures = [batcher.submit(i, "m", request) for i, request in enumerate(requests)]
        continuous = [future.result(timeout=120).result for future in futures]
    finally:
        batcher.stop()
    for results in (static, continuous):
        assert [(r.text, r.token_ids, len(r.logprobs)) for r in results] == oracle
        for result, request in zip(results, requests, strict=True):
            assert not any(stop in result.text for stop in request.stop)


def test_a_static_batch_whose_rows_all_wrote_their_stops_ends_there(tiny_model: Path) -> None:
    """generate() runs a batch until every row ended: a row that wrote its stop string is ended at
    the next step, so a batch of such rows does not run on to the longest max_new_tokens."""
    engine = TransformersEngine("tiny", "v", tiny_model)
    plain = [EngineRequest(engine.tokenize(p), 40, SamplingParams()) for p in PROMPTS[:4]]
    alone = [engine.generate([request])[0] for request in plain]
    requests, oracle = [], []
    for k, (request, result) in enumerate(zip(plain, alone, strict=True)):  # rows end at different steps
        stop = next(result.text[i:i + 2] for i in range(2 + 8 * k, len(result.text)) if result.text[i:i + 2].strip())
        requests.append(EngineRequest(request.prompt_ids, 40, request.sampling, stop=(stop,)))
        oracle.append(expected(engine, result.token_ids, result.logprobs, (stop,)))
    longest_stop = max(len(tokens) for _, tokens, _ in oracle)
    assert longest_stop + 1 < 40 and all(len(result.token_ids) == 40 for result in alone)
    assert len({len(tokens) for _, tokens, _ in oracle}) > 1

    forwards = []
    hook = engine.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        static = engine.generate(requests)
    finally:
        hook.remove()
    assert [(r.text, r.token_ids, len(r.logprobs)) for r in static] == oracle
    # One forward per token up to the last stop, one more that ends its row: not 40.
    assert len(forwards) == longest_stop + 1, [len(t) for _, t, _ in oracle]


def test_a_stop_string_written_by_the_last_allowed_token_is_a_stop_not_a_cut(tiny_model: Path) -> None:
    """Such a row used all its max_new_tokens, so its token count looks like a cut; the engine
    says "stop" (it wrote the stop), and "length" for the same row without the stop string."""
    engine = TransformersEngine("tiny", "v", tiny_model)
    prompt_ids = engine.tokenize(PROMPTS[1])
    whole = engine.generate([EngineRequest(prompt_ids, 24, SamplingParams())])[0]
    stop = next(whole.text[i:i + 3] for i in range(4, len(whole.text)) if whole.text[i:i + 3].strip())
    _, tokens, _ = expected(engine, whole.token_ids, whole.logprobs, (stop,))
    last = len(tokens)  # the stop is complete exactly at this many tokens
    stopped = EngineRequest(prompt_ids, last, SamplingParams(), stop=(stop,))
    cut = EngineRequest(prompt_ids, last, SamplingParams())

    static = engine.generate([stopped, cut])
    batcher = ContinuousBatcher({"m": engine}, lambda _: BatchingPolicy(max_batch=4, max_wait_ms=1,
                                                                        mode="continuous"))
    batcher.start()
    try:
        continuous = [batcher.submit(i, "m", r).result(timeout=120).result for i, r in enumerate((stopped, cut))]
    finally:
        batcher.stop()
    for ended_by_stop, ended_by_cut in (static, continuous):
        assert len(ended_by_stop.token_ids) == len(ended_by_cut.token_ids) == last
        assert (ended_by_stop.finish_reason, ended_by_cut.finish_reason) == ("stop", "length")
        assert stop not in ended_by_stop.text and stop in ended_by_cut.text


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_ends_the_text_at_the_stop_string_given_at_submit(stack: LocalStack) -> None:
    settings = stack.settings()
    with session_factory(settings)() as session:
        demo = TransformersEngine("demo", "v", Path(registry.resolve(session, "demo").path))
    prompt = "Return a new list"
    whole = demo.generate([EngineRequest(demo.tokenize(prompt), 24, SamplingParams())])[0]
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
    text, tokens, _ = expected(demo, whole.token_ids, whole.logprobs, (stop,))
    worker = stack.device_worker("cpu.0").start()
    client = Client(settings)
    job = client.submit(prompt, model="demo", max_new_tokens=24, stop=stop)
    unstopped = client.submit(prompt, model="demo", max_new_tokens=24)
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    done, free = client.wait([job.id, unstopped.id], timeout=240)
    assert done.status == "succeeded", worker.log_tail()
    assert (done.text, done.tokens_generated, done.params["stop"]) == (text, len(tokens), [stop])
    assert done.finish_reason == "stop" and free.text == whole.text
    assert free.finish_reason == ("length" if len(whole.token_ids) == 24 else "stop")
    # The CLI: --stop, repeated.
    queued = subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", "submit", prompt, "--stop", stop,
                             "--stop", "###", "--max-new-tokens", "24", "--wait", "--json"], cwd=REPO_ROOT,
                            env=stack.process_env({}), capture_output=True, text=True, timeout=240)
    assert queued.returncode == 0, queued.stderr
    [shown] = json.loads(queued.stdout)
    assert (shown["text"], shown["params"]["stop"], shown["finish_reason"]) == (text, [stop, "###"], "stop")
