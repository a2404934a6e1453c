"""The device's batching loop, with the deterministic stub engine (pure logic, no services)."""

from __future__ import annotations

import threading
import time

import pytest

from textnlp_jobs.errors import JobDroppedError, OutOfMemoryError
from textnlp_jobs.inference.batcher import MicroBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, StubEngine
from textnlp_jobs.settings import BatchingPolicy

GREEDY = SamplingParams()


def request(words: int, max_new_tokens: int = 8, sampling: SamplingParams = GREEDY) -> EngineRequest:
    return EngineRequest(list(range(1, words + 1)), max_new_tokens, sampling)


def batcher_with(engine: StubEngine, max_batch: int = 4, max_wait_ms: float = 200, **kwargs: object) -> MicroBatcher:
    batcher = MicroBatcher({"stub": engine}, lambda model: BatchingPolicy(max_batch=max_batch, max_wait_ms=max_wait_ms),
                           **kwargs)  # type: ignore[arg-type]
    batcher.start()
    return batcher


def test_compatible_jobs_share_one_batch_up_to_max_batch() -> None:
    engine = StubEngine()
    batcher = batcher_with(engine, max_batch=4)
    futures = [batcher.submit(i, "stub", request(3)) for i in range(10)]
    results = [f.result(timeout=5) for f in futures]
    batcher.stop()
    assert sorted(engine.batches, reverse=True)[:2] == [4, 4]
    assert sum(engine.batches) == 10
    assert all(r.result.token_ids == [3, 2, 1] for r in results)


def test_greedy_and_sampled_jobs_never_share_a_batch() -> None:
    engine = StubEngine()
    batcher = batcher_with(engine, max_batch=8, max_wait_ms=100)
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    futures = [batcher.submit(i, "stub", request(2, sampling=GREEDY if i % 2 else sampled)) for i in range(8)]
    sizes = {f.result(timeout=5).batch_size for f in futures}
    batcher.stop()
    assert sizes == {4}
    assert engine.batches == [4, 4]


def test_each_row_stops_at_its_own_max_new_tokens() -> None:
    engine = StubEngine()
    batcher = batcher_with(engine)
    futures = [batcher.submit(i, "stub", request(6, max_new_tokens=n)) for i, n in enumerate((1, 3, 6))]
    assert [f.result(timeout=5).result.tokens_generated for f in futures] == [1, 3, 6]
    batcher.stop()


def test_a_batch_closes_after_max_wait_even_when_not_full() -> None:
    engine = StubEngine()
    batcher = batcher_with(engine, max_batch=64, max_wait_ms=30)
    assert batcher.submit(1, "stub", request(2)).result(timeout=5).batch_size == 1
    batcher.stop()


def test_a_cancelled_job_in_a_waiting_batch_is_never_generated() -> None:
    engine = StubEngine()
    cancelled = {"job-2"}
    seen: list[int] = []
    original = engine.generate

    def recording_generate(requests):  # type: ignore[no-untyped-def]
        seen.extend(len(r.prompt_ids) for r in requests)
        return original(requests)

    engine.generate = recording_generate  # type: ignore[method-assign]
    batcher = batcher_with(engine, max_batch=3, drop_filter=lambda batch: {p.job_id for p in batch} & cancelled)
    futures = {f"job-{i}": batcher.submit(f"job-{i}", "stub", request(i + 1)) for i in range(3)}
    with pytest.raises(JobDroppedError):
        futures["job-2"].result(timeout=5)
    assert futures["job-0"].result(timeout=5).result.token_ids == [1]
    assert futures["job-1"].result(timeout=5).batch_size == 2
    batcher.stop()
    assert 3 not in seen  # job-2's prompt (3 tokens) never reached the engine


def test_out_of_memory_splits_the_batch_and_completes_every_job() -> None:
    engine = StubEngine(fail_above=2)
    batcher = batcher_with(engine, max_batch=8)
    futures = [batcher.submit(i, "stub", request(2)) for i in range(8)]
    assert all(f.result(timeout=5).result.token_ids == [2, 1] for f in futures)
    batcher.stop()
    assert engine.batches == [2, 2, 2, 2]


def test_out_of_memory_for_a_single_job_fails_it_with_inference_oom() -> None:
    batcher = batcher_with(StubEngine(fail_above=0), max_batch=1)
    with pytest.raises(OutOfMemoryError) as caught:
        batcher.submit(1, "stub", request(2)).result(timeout=5)
    batcher.stop()
    assert caught.value.code == "inference.oom"


def test_one_bad_row_fails_only_itself() -> None:
    engine = StubEngine()
    original = engine.generate

    def generate_rejecting_long_prompts(requests):  # type: ignore[no-untyped-def]
        if any(len(r.prompt_ids) == 5 for r in requests):
            raise ValueError("row cannot be generated")
        return original(requests)

    engine.generate = generate_rejecting_long_prompts  # type: ignore[method-assign]
    batcher = batcher_with(engine, max_batch=4)
    futures = [batcher.submit(i, "stub", request(n)) for i, n in enumerate((2, 5, 3, 4))]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=5).result.tokens_generated)
        except Exception as error:
            outcomes.append(type(error).__name__)
    batcher.stop()
    assert outcomes == [2, "InferenceError", 3, 4]


def test_stopping_fails_waiting_jobs_so_they_can_be_redelivered() -> None:
    engine = StubEngine()
    gate = threading.Event()
    original = engine.generate

    def slow_generate(requests):  # type: ignore[no-untyped-def]
        gate.wait(5)
        return original(requests)

    engine.generate = slow_generate  # type: ignore[method-assign]
    batcher = batcher_with(engine, max_batch=1, max_wait_ms=0)
    first = batcher.submit(1, "stub", request(2))
    time.sleep(0.1)
    second = batcher.submit(2, "stub", request(2))
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    gate.set()
    stopper.join(5)
    assert first.result(timeout=5).result.token_ids == [2, 1]
    assert type(second.exception(timeout=5)).__name__ == "WorkerShuttingDownError"
