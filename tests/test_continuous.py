"""Continuous batching: jobs join a running batch between decode steps and leave when done; per-job
sampling, seeds, greedy text and log-probabilities are those of the job run alone."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db.models import utcnow
from textnlp_jobs.errors import OutOfMemoryError
from textnlp_jobs.inference.batcher import BatchedResult, MicroBatcher
from textnlp_jobs.inference.continuous import MAX_JOIN_WAIT_STEPS, ContinuousBatcher, JoinCost, _Running
from textnlp_jobs.inference.decoders import roomy_layer
from textnlp_jobs.inference.device import DeviceRuntime
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, StubEngine, TransformersEngine
from textnlp_jobs.local_stack import LocalStack
from textnlp_jobs.metrics.registry import REGISTRY
from textnlp_jobs.settings import BatchingPolicy

from .helpers import result_writes

PROMPTS = [
    "Return a new list",
    "This module provides functions for working with paths and files on disk",
    "A",
    "The default value of the timeout argument is None, which means",
    "Raise an exception if",
    "Create a new thread and start it",
]
GREEDY = SamplingParams()
WARM = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)
HOT = SamplingParams(temperature=1.3, top_p=1.0, top_k=0)


@pytest.fixture(scope="module")
def engine(model_store: Path) -> TransformersEngine:
    (version_dir,) = (model_store / "demo").iterdir()
    return TransformersEngine("demo", version_dir.name, version_dir)


def run(batcher: MicroBatcher | ContinuousBatcher, requests: list[EngineRequest]) -> list[BatchedResult]:
    batcher.start()
    try:
        futures = [batcher.submit(i, "demo", r) for i, r in enumerate(requests)]
        return [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()


def continuous(engine: TransformersEngine | StubEngine, max_batch: int, max_wait_ms: float = 500) -> ContinuousBatcher:
    return ContinuousBatcher({"demo": engine}, lambda _: BatchingPolicy(max_batch=max_batch, max_wait_ms=max_wait_ms,
                                                                        mode="continuous"))


def alone(engine: TransformersEngine, requests: list[EngineRequest]) -> list[BatchedResult]:
    return run(MicroBatcher({"demo": engine}, lambda _: BatchingPolicy(max_batch=1, max_wait_ms=0)), requests)


def test_greedy_jobs_give_the_same_tokens_in_a_continuous_batch_as_alone(engine: TransformersEngine) -> None:
    limits = [16, 3, 7, 16, 1, 9]
    requests = [EngineRequest(engine.tokenize(p), n, GREEDY) for p, n in zip(PROMPTS, limits, strict=True)]
    batched = run(continuous(engine, 6), requests)
    single = alone(engine, requests)
    assert max(r.batch_size for r in batched) == 6
    assert [r.result.token_ids for r in batched] == [r.result.token_ids for r in single]
    for b, s in zip(batched, single, strict=True):  # the model's own log-probabilities, per token
        assert len(b.result.logprobs) == b.result.tokens_generated
        assert b.result.logprobs == pytest.approx(s.result.logprobs, abs=1e-4)


def test_seeded_jobs_draw_the_same_tokens_in_any_continuous_batch(engine: TransformersEngine) -> None:
    seeded = [EngineRequest(engine.tokenize(p), 12, WARM, seed=1000 + i) for i, p in enumerate(PROMPTS)]
    neighbours = [EngineRequest(engine.tokenize(p), 20, HOT, seed=7) for p in reversed(PROMPTS)]
    first = run(continuous(engine, 6), seeded)
    with_others = run(continuous(engine, 12), neighbours[:3] + seeded + neighbours[3:])[3:9]
    assert [r.result.token_ids for r in first] == [r.result.token_ids for r in with_others]
    assert [r.result.token_ids for r in first] == [r.result.token_ids for r in alone(engine, seeded)]


def test_jobs_with_different_sampling_settings_share_one_running_batch(engine: TransformersEngine) -> None:
    settings = [GREEDY, WARM, HOT, GREEDY, WARM, HOT]
    requests = [EngineRequest(engine.tokenize(p), 10, s, seed=50 + i)
                for i, (p, s) in enumerate(zip(PROMPTS, settings, strict=True))]
    batched = run(continuous(engine, 6), requests)
    assert {r.batch_size for r in batched} == {6}  # one admission: not split by sampling settings
    assert [r.result.token_ids for r in batched] == [r.result.token_ids for r in alone(engine, requests)]


def test_the_decoder_hands_the_model_its_cache_under_the_name_this_transformers_takes(
        engine: TransformersEngine) -> None:
    # transformers 5.25 renamed the forward's past_key_values to cache: the old name warns there
    # and is to be removed in 5.40, when a decoder still using it would stop working.
    decoder = engine.decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        decoder.admit([(0, EngineRequest(engine.tokenize(PROMPTS[1]), 5, GREEDY))])
        decoder.admit([(1, EngineRequest(engine.tokenize(PROMPTS[0]), 5, GREEDY))])
        while len(decoder):
            decoder.step()


def test_rows_that_leave_and_join_a_running_batch_keep_the_greedy_tokens_of_each_alone(
        engine: TransformersEngine) -> None:
    # Three rows for six jobs of different lengths: rows leave, newcomers join, and the cache is
    # merged and compacted around the rows still decoding, many times over.
    limits = [9, 2, 14, 5, 1, 11]
    requests = [EngineRequest(engine.tokenize(p), n, GREEDY) for p, n in zip(PROMPTS, limits, strict=True)]
    batched = run(continuous(engine, 3, max_wait_ms=0), requests)
    assert [r.result.token_ids for r in batched] == [r.result.token_ids for r in alone(engine, requests)]


def test_a_decode_step_writes_its_cache_column_in_place(engine: TransformersEngine) -> None:
    # transformers' own layer copies the whole cache into a new tensor every step (torch.cat).
    requests = [EngineRequest(engine.tokenize(p), 4, GREEDY) for p in PROMPTS]
    # Rows that decode past the step below (no end of text on the way: their greedy text alone says so).
    lasting = [r for r, out in zip(requests, alone(engine, requests), strict=True) if out.result.tokens_generated == 4]
    assert lasting
    decoder = engine.decoder()
    decoder.admit(list(enumerate(lasting)))
    layers = decoder._layers_of(decoder.cache)
    where = [(k.data_ptr(), v.data_ptr()) for k, v in layers]
    width = layers[0][0].shape[-2]
    decoder.step()
    layers = decoder._layers_of(decoder.cache)
    assert [(k.data_ptr(), v.data_ptr()) for k, v in layers] == where
    assert layers[0][0].shape[-2] == width + 1


def test_out_of_memory_while_compacting_finished_rows_away_leaves_the_rest_decoding(
        engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [EngineRequest(engine.tokenize(p), n, GREEDY) for p, n in zip(PROMPTS, [2, 9, 5, 12, 3, 7], strict=True)]
    decoder = engine.decoder()
    new_cache, refused = decoder._new_cache, []

    def no_room_to_compact(layers: Any = (), *, room: int = 0) -> Any:
        if layers:  # a compaction (no join happens here)
            refused.append(len(layers))
            raise OutOfMemoryError("no room for the compacted copy")
        return new_cache(layers, room=room)

    monkeypatch.setattr(decoder, "_new_cache", no_room_to_compact)
    finished = decoder.admit(list(enumerate(requests)))
    while len(decoder):
        finished += decoder.step()
    assert refused  # rows that left were kept, masked, beside the rows still decoding
    tokens = {key: result.token_ids for key, result in finished}
    assert [tokens[i] for i in range(len(requests))] == [r.result.token_ids for r in alone(engine, requests)]


def test_a_roomy_cache_layer_holds_what_transformers_own_layer_holds() -> None:
    import torch
    from transformers.cache_utils import DynamicLayer

    roomy_class = roomy_layer()
    assert roomy_class is not None
    roomy, plain = roomy_class(), DynamicLayer()  # no room reserved: every few steps its buffers move
    generator = torch.Generator().manual_seed(3)

    def update(columns: int) -> None:
        keys, values = (torch.randn(2, 3, columns, 4, generator=generator) for _ in range(2))
        for layer in (roomy, plain):
            layer.update(keys, values)
        assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)

    update(5)  # a prefill
    for _ in range(40):  # decode steps, past the buffers' room more than once
        update(1)
    for layer in (roomy, plain):  # keys replaced from outside (as batch_select_indices does)
        layer.batch_select_indices(torch.tensor([1, 0]))
    for _ in range(3):
        update(1)


def test_a_job_submitted_while_a_batch_decodes_joins_it_and_leaves_first() -> None:
    engine = StubEngine("demo", step_seconds=0.02)
    batcher = continuous(engine, 4, max_wait_ms=0)
    batcher.start()
    try:
        long = batcher.submit("long", "demo", EngineRequest(list(range(1, 41)), 40, GREEDY))
        time.sleep(0.2)  # the long job is decoding alone now
        short = batcher.submit("short", "demo", EngineRequest([1, 2, 3], 3, GREEDY)).result(timeout=10)
        assert not long.done()  # the short job joined the running batch, finished and left
        assert short.batch_size == 2 and short.result.token_ids == [3, 2, 1]
        assert long.result(timeout=10).result.tokens_generated == 40
    finally:
        batcher.stop()
    assert engine.batches == [1, 2]


@pytest.mark.parametrize("loop", ["continuous", "static"])
def test_jobs_that_finish_in_one_step_are_resolved_in_one_results_block(loop: str) -> None:
    # The engine process's outbox holds its sender for the block, so such a group reaches the
    # worker as one message and is written in one statement (engine_process.serve).
    engine = StubEngine("demo")
    batcher = continuous(engine, 4, max_wait_ms=200) if loop == "continuous" else \
        MicroBatcher({"demo": engine}, lambda _: BatchingPolicy(max_batch=4, max_wait_ms=200), name="stub")
    blocks: list[list[str]] = []
    open_block: list[str] = []

    @contextlib.contextmanager
    def together() -> Iterator[None]:
        open_block.clear()
        yield
        blocks.append(sorted(open_block))

    batcher.results_together = together
    futures = [batcher.submit(name, "demo", EngineRequest([1, 2], 2, GREEDY)) for name in "abcd"]
    for name, future in zip("abcd", futures, strict=True):  # before the loop starts: no race
        future.add_done_callback(lambda _, name=name: open_block.append(name))
    batcher.start()
    try:
        assert all(f.result(timeout=10).batch_size == 4 for f in futures)
    finally:
        batcher.stop()
    assert ["a", "b", "c", "d"] in blocks


def test_the_join_cost_separates_the_fixed_part_from_the_newcomers_own_prefill() -> None:
    cost = JoinCost()
    assert cost.in_steps() == 1.0  # nothing timed yet
    cost.step_timed(0.010)
    cost.join_timed(16, 0.040)
    assert cost.in_steps() == pytest.approx(2.0)  # one size only: half of what it took
    for rows in [4, 64, 8, 32, 16, 48, 2, 24] * 4:
        cost.join_timed(rows, 0.030 + 0.002 * rows)  # 30 ms each join + 2 ms per newcomer
    assert cost.fixed_seconds() == pytest.approx(0.030, rel=0.05)
    assert cost.in_steps() == pytest.approx(3.0, rel=0.05)


def running_batch(rows: int, step_seconds: float, join_steps: float) -> _Running:
    running = _Running(StubEngine("demo"), None)  # type: ignore[arg-type]
    running.jobs = {i: None for i in range(rows)}  # type: ignore[misc]
    running.join_cost.step_timed(step_seconds)
    running.join_cost.join_timed(8, 2 * join_steps * step_seconds)  # the assumed half is join_steps
    return running


def test_waiting_jobs_join_once_the_rows_left_empty_cost_as_much_as_a_join() -> None:
    running = running_batch(rows=100, step_seconds=0.004, join_steps=2.0)  # a join costs 200 row-steps
    now = 1000.0
    decisions = []
    for step in range(14):
        decisions.append(running.should_join(16, now + step * 0.004, max_wait=1.0))
    # 16 empty rows a step: 12 steps lose 192 row-steps, the 13th reaches 208 >= 200 and joins
    assert decisions.index(True) == 12


def test_free_rows_never_stand_empty_beside_waiting_jobs_for_long() -> None:
    running = running_batch(rows=100, step_seconds=0.004, join_steps=50.0)  # joining would pay only late
    assert not running.should_join(1, 1000.0, max_wait=0.02)
    assert not running.should_join(1, 1000.0 + 0.02, max_wait=0.02)  # max_wait_ms, but under the step floor
    assert running.should_join(1, 1000.0 + MAX_JOIN_WAIT_STEPS * 0.004 + 0.001, max_wait=0.02)
    empty = running_batch(rows=0, step_seconds=0.004, join_steps=50.0)
    assert empty.should_join(1, 1000.0, max_wait=0.02)  # nothing running: a start, not a join


def loop_counter(family: str, phase: str) -> float:
    value = REGISTRY.get_sample_value(f"textnlp_device_loop_{family}_total", {"model_name": "demo", "phase": phase})
    return value or 0.0


def test_the_device_loop_accounts_its_steps_and_joins_in_metrics() -> None:
    before = {(f, p): loop_counter(f, p) for f in ("seconds", "operations", "rows") for p in ("start", "join", "step")}
    engine = StubEngine("demo", step_seconds=0.01)
    batcher = continuous(engine, 4, max_wait_ms=0)
    batcher.start()
    try:
        long = batcher.submit("long", "demo", EngineRequest(list(range(1, 21)), 20, GREEDY))
        time.sleep(0.05)
        batcher.submit("short", "demo", EngineRequest([1, 2, 3], 3, GREEDY)).result(timeout=10)
        long.result(timeout=10)
    finally:
        batcher.stop()
    grew = {key: loop_counter(*key) - value for key, value in before.items()}
    assert grew["operations", "start"] == 1 and grew["rows", "start"] == 1
    assert grew["operations", "join"] == 1 and grew["rows", "join"] == 1
    assert grew["operations", "step"] >= 18  # 20 tokens: the stub's start and join each step every row too
    assert grew["seconds", "step"] >= 0.01 * 18  # each step sleeps 10 ms
    assert grew["rows", "step"] > grew["operations", "step"]  # two rows ran side by side for a while


def start_runtime(client: Client, engine: StubEngine) -> DeviceRuntime:
    runtime = DeviceRuntime(client.settings, client.sessions, {"demo": engine}, worker_name="test/cpu.0",
                            republish=lambda routings: None)
    assert runtime.mode == "continuous"
    runtime.start()
    return runtime


@pytest.mark.integration
def test_a_job_cancelled_mid_decode_and_one_past_its_deadline_stop_and_write_no_result(stack: LocalStack) -> None:
    client = Client(stack.settings(batching={"*": {"max_batch": 4, "max_wait_ms": 50, "mode": "continuous"}}))
    words = " ".join(f"w{i}" for i in range(60))  # 60 steps of 20 ms: over a second of decoding
    cancelled, overdue, kept = client.submit_many([
        {"prompt": words, "model": "demo", "max_new_tokens": 60},
        {"prompt": words, "model": "demo", "max_new_tokens": 60, "deadline": utcnow() + timedelta(seconds=0.6)},
        {"prompt": "a short one", "model": "demo", "max_new_tokens": 3},
    ])
    runtime = start_runtime(client, StubEngine("demo", step_seconds=0.02))
    outcomes: dict[uuid.UUID, str] = {}
    threads = [threading.Thread(target=lambda i=job.id: outcomes.__setitem__(i, runtime.run_job(i)))
               for job in (cancelled, overdue, kept)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # all three are decoding
    client.cancel(cancelled.id)
    for thread in threads:
        thread.join(10)
    runtime.stop()
    assert outcomes == {cancelled.id: "cancelled", overdue.id: "expired", kept.id: "succeeded"}
    assert [client.get(j.id).status for j in (cancelled, overdue, kept)] == ["cancelled", "expired", "succeeded"]
    assert result_writes(client, [cancelled.id, overdue.id, kept.id]) == {str(kept.id): 1}
