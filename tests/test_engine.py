"""The real transformers engine on the real demo model, loaded with from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest

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
