"""Short full garbage collections in the processes that keep a device busy.

A full (generation 2) collection walks every object the collector tracks. A device worker and
its engine process hold a few hundred thousand from start-up alone: the modules imported (torch,
transformers, Celery, SQLAlchemy), the model and tokenizer objects, the app's state. On the
2-core machine one full collection took 170–250 ms, once or twice per 2,048-job run, in each
process. In the engine process it stalled the decode loop for that long. In the worker it stalled
the claims and writes that feed the loop, so the device sat idle once its waiting jobs ran out.

Those start-up objects live as long as the process, so walking them again finds nothing to free.
``freeze_start_up_heap`` collects once, then moves everything left into the collector's permanent
generation (``gc.freeze``): later full collections walk only what was made after, the jobs in
flight and what they left behind. The collector still runs; its thresholds are unchanged.

What it costs: an object alive at the freeze that later becomes garbage inside a reference cycle
is never freed. What a worker does let go of later (a model version replaced by a promotion, its
tokenizer, a decoder and its cache) holds no cycle and goes by reference counting alone
(``tests/test_heap.py``).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_start_up_heap(process: str) -> None:
    """Collect once, then keep what is left out of later collections (see the module docstring).
    Call it when start-up is over: models loaded and warmed up, the worker ready."""
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    log.info("start_up_heap_frozen process=%s objects=%d seconds=%.3f", process, gc.get_freeze_count(),
             time.monotonic() - started)
