"""The start-up heap is collected once, then kept out of later collections (heap.py)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from textnlp_jobs.heap import freeze_start_up_heap
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_garbage_is_collected_before_the_rest_of_the_heap_is_frozen() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    dead = weakref.ref(a)
    kept = Node()
    del a, b
    try:
        freeze_start_up_heap("test")
        assert dead() is None  # freed, not frozen for the life of the process
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it
    finally:
        gc.unfreeze()  # this is a test process: leave its collector as it was
    assert any(o is kept for o in gc.get_objects())


def test_an_engine_its_decoder_and_cache_go_by_reference_counting_alone(model_store: Path) -> None:
    # What freezing costs: an object alive at the freeze that later becomes garbage inside a
    # reference cycle is never freed. What a worker does drop later (a model version replaced by a
    # promotion, its tokenizer, a decoder and its cache) must hold no cycle.
    (version_dir,) = (model_store / "demo").iterdir()
    engine = TransformersEngine("demo", version_dir.name, version_dir)
    decoder = engine.decoder()
    requests = [(i, EngineRequest(engine.tokenize("Return a new list" * (i + 1)), 4,
                                  SamplingParams(0.9 if i % 2 else 0.0, 0.95, 0), 7 if i % 2 else None))
                for i in range(4)]
    decoder.admit(requests[:2])
    decoder.step()
    decoder.admit(requests[2:])
    decoder.step()
    gone = [weakref.ref(o) for o in (engine, engine.model, engine.tokenizer, decoder)]
    gc.collect()
    gc.disable()  # nothing but reference counting may free them
    try:
        del engine, decoder
        assert [ref() is None for ref in gone] == [True] * len(gone)
    finally:
        gc.enable()
