"""The real transformers engine on the real demo model, loaded with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest

from textnlp_jobs.errors import ErrorCode, InputError, TokenizationError
from textnlp_jobs.inference.batcher import MicroBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.settings import BatchingPolicy

PROMPTS = [
    "Return a new list",
    "This module provides functions for working with paths and files on disk",
    "A",
    "The default value of the timeout argument is None, which means",
    "Raise an exception if",
    "Create a new thread and start it",
]


@pytest.fixture(scope="module")
def engine(model_store: Path) -> TransformersEngine:
    (version_dir,) = (model_store / "demo").iterdir()
    return TransformersEngine("demo", version_dir.name, version_dir)


def run_through_batcher(engine: TransformersEngine, requests: list[EngineRequest], max_batch: int) -> list[list[int]]:
    batcher = MicroBatcher({"demo": engine}, lambda _: BatchingPolicy(max_batch=max_batch, max_wait_ms=500))
    batcher.start()
    try:
        futures = [batcher.submit(i, "demo", r) for i, r in enumerate(requests)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert max(r.batch_size for r in results) == min(max_batch, len(requests))
    return [r.result.token_ids for r in results]


def test_batched_and_unbatched_runs_give_identical_greedy_text(engine: TransformersEngine) -> None:
    requests = [EngineRequest(engine.tokenize(p), 16, SamplingParams()) for p in PROMPTS]
    assert run_through_batcher(engine, requests, max_batch=6) == run_through_batcher(engine, requests, max_batch=1)


def test_seeded_sampling_gives_the_same_text_alone_or_in_a_batch(engine: TransformersEngine) -> None:
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
    requests = [EngineRequest(engine.tokenize(p), 12, sampling, seed=1000 + i) for i, p in enumerate(PROMPTS)]
    assert run_through_batcher(engine, requests, max_batch=6) == run_through_batcher(engine, requests, max_batch=1)


def test_each_row_respects_its_own_max_new_tokens_in_one_batch(engine: TransformersEngine) -> None:
    limits = [1, 3, 7, 16, 2, 5]
    requests = [EngineRequest(engine.tokenize(p), n, SamplingParams()) for p, n in zip(PROMPTS, limits, strict=True)]
    results = engine.generate(requests)
    for result, limit in zip(results, limits, strict=True):
        assert 1 <= result.tokens_generated <= limit
        assert len(result.logprobs) == result.tokens_generated
        assert all(lp <= 0 for lp in result.logprobs)


def test_every_job_gets_at_least_one_token_and_text(engine: TransformersEngine) -> None:
    results = engine.generate([EngineRequest(engine.tokenize(p), 8, SamplingParams()) for p in PROMPTS])
    assert all(r.tokens_generated >= 1 and r.text for r in results)


def test_prompts_tokenized_together_get_the_ids_they_get_alone(engine: TransformersEngine) -> None:
    prompts = [*PROMPTS, "naïve café — 東京 🚀", "  leading and trailing  ", "tab\tand\nnewline",
               f"ends here{engine.tokenizer.eos_token} and goes on"]
    assert engine._plain_backend() is not None  # the fast path, straight to the Rust tokenizer
    together = engine.tokenize_many(prompts)
    assert together == [engine.tokenize(p) for p in prompts]


def test_a_tokenizer_configured_to_truncate_is_called_through_transformers(engine: TransformersEngine) -> None:
    prompts = [*PROMPTS, "a longer prompt that the backend alone would cut short after a few tokens"]
    alone = [engine.tokenize(p) for p in prompts]
    engine.tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    try:
        assert engine._plain_backend() is None
        assert engine.tokenize_many(prompts) == alone  # transformers resets the backend's truncation
    finally:
        engine.tokenizer.backend_tokenizer.no_truncation()


def test_a_prompt_without_tokens_fails_alone_when_tokenized_with_others(engine: TransformersEngine) -> None:
    together = engine.tokenize_many(["Return a new list", "", "Raise an exception if"])
    assert together[0] == engine.tokenize("Return a new list")
    assert isinstance(together[1], TokenizationError)
    assert together[2] == engine.tokenize("Raise an exception if")


def test_a_message_of_jobs_fails_only_the_jobs_refused_at_once(engine: TransformersEngine) -> None:
    from textnlp_jobs.inference.engine_side import JobSpec, LocalEngineSide
    from textnlp_jobs.settings import Settings

    settings = Settings(max_prompt_tokens=8, batching={"*": BatchingPolicy(max_batch=8, max_wait_ms=20)})
    side = LocalEngineSide(settings, None, {"demo": engine}, name="cpu.0")  # type: ignore[arg-type]
    side.batcher.drop_filter = None  # no ledger here: nothing is cancelled
    side.start()
    try:
        def spec(prompt: str) -> JobSpec:
            return JobSpec(prompt, False, 4, SamplingParams(), None)

        long_prompt = " ".join(["word"] * 40)
        futures = side.submit_many([("a", "demo", spec("Return a new list")), ("b", "demo", spec(long_prompt)),
                                    ("c", "other", spec("Return a new list")), ("d", "demo", spec("")),
                                    ("e", "demo", spec("Raise an exception if"))])
        assert futures[0].result(timeout=60).result.tokens_generated >= 1
        assert futures[4].result(timeout=60).result.tokens_generated >= 1
        with pytest.raises(InputError) as over:
            futures[1].result(timeout=5)
        assert over.value.code == ErrorCode.INPUT_PROMPT_TOO_MANY_TOKENS and "limit of 8 tokens" in over.value.message
        with pytest.raises(InputError) as not_here:
            futures[2].result(timeout=5)
        assert not_here.value.code == ErrorCode.INPUT_MODEL_NOT_ON_DEVICE
        with pytest.raises(TokenizationError):
            futures[3].result(timeout=5)
    finally:
        side.stop()
