"""A simulated device for ``bench/throughput.py --simulated-device STEP_MS[,PREFILL_MS[,HOST_MS]]``.

Python imports this module at start-up when its folder is on ``PYTHONPATH`` (the bench puts it
there for itself and for the worker it starts, whose engine process inherits it). With
``BENCH_SIMULATED_DEVICE`` set, ``TransformersDecoder``'s prefill and decode step do no model work:
they sleep for the device's time, with the GIL and the CPU free, as a GPU step leaves them to the
host, and every row takes one ordinary token per step until its ``max_new_tokens``. The rest of the
system (tokenizing, the ledger, the broker, the engine process, the loop's own bookkeeping and the
results' text) runs for real. So on a CPU machine the system's own costs show at a GPU's time
scale: a decode step of ``STEP_MS`` whatever its rows (a small model on a GPU is bound by kernel
launches, not rows), a start or a join of ``PREFILL_MS``.

``HOST_MS`` (default 0) models the host's side of a step: launching a small model's kernels is
Python and dispatch work that holds the GIL, and on a launch-bound model it is most of the step.
Each step and prefill first runs ``HOST_MS`` of this thread's own CPU time in Python (time spent
waiting for the GIL or for a core does not count, so another thread of the engine process that
takes the GIL makes the step longer, as it would on a GPU host), then sleeps for whatever of
``STEP_MS`` (or ``PREFILL_MS``) is left: the device's work, overlapping the launches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Hashable, Sequence
from typing import Any

ENVIRONMENT = "BENCH_SIMULATED_DEVICE"


def parse(value: str) -> tuple[float, float, float]:
    """``STEP_MS[,PREFILL_MS[,HOST_MS]]`` as seconds (the prefill defaults to 1.5 steps, the host's
    share of each to none)."""
    step, _, rest = value.partition(",")
    prefill, _, host = rest.partition(",")
    step_s = float(step) / 1000.0
    prefill_s = float(prefill) / 1000.0 if prefill.strip() else 1.5 * step_s
    host_s = float(host) / 1000.0 if host.strip() else 0.0
    if step_s <= 0 or prefill_s <= 0:
        raise ValueError(f"{ENVIRONMENT}={value!r}: times must be positive milliseconds")
    if not 0 <= host_s <= step_s:
        raise ValueError(f"{ENVIRONMENT}={value!r}: HOST_MS must be between 0 and STEP_MS")
    return step_s, prefill_s, host_s


def device_time(seconds: float, host_s: float) -> None:
    """``host_s`` of this thread's CPU time in Python (the launches, holding the GIL between
    bytecodes as dispatch does between ops), then sleep out the rest of ``seconds``."""
    started = time.perf_counter()
    if host_s:
        spent_until = time.thread_time() + host_s
        while time.thread_time() < spent_until:
            pass
    left = seconds - (time.perf_counter() - started)
    if left > 0:
        time.sleep(left)


def install(value: str) -> None:
    """Replace ``TransformersDecoder``'s model work with the simulated device's sleeps."""
    from textnlp_jobs.inference import decoders
    from textnlp_jobs.inference.engine import finished_result

    step_s, prefill_s, host_s = parse(value)

    def token_for(decoder: Any) -> int:
        stops = set(decoder.engine.stop_ids)
        return next(t for t in range(1, 1_000) if t not in stops)

    def leave(decoder: Any) -> list[tuple[Hashable, Any]]:
        done = []
        for row in decoder.rows:
            if len(row.tokens) >= row.request.max_new_tokens:
                row.done = True
                done.append((row.key, finished_result(decoder.engine.tokenizer, row.request, row.tokens,
                                                      row.logprobs, ended=False)))
        decoder.rows = [row for row in decoder.rows if not row.done]
        return done

    def advance(decoder: Any, rows: Sequence[Any]) -> None:
        token = token_for(decoder)
        for row in rows:
            row.tokens.append(token)
            row.logprobs.append(-1.0)

    def admit(self: Any, rows: Sequence[tuple[Hashable, Any]]) -> list[tuple[Hashable, Any]]:
        device_time(prefill_s, host_s)
        new = [decoders._Row(key, request, None) for key, request in rows]
        advance(self, new)
        self.rows.extend(new)
        return leave(self)

    def step(self: Any) -> list[tuple[Hashable, Any]]:
        if not self.rows:
            return []
        device_time(step_s, host_s)
        advance(self, self.rows)
        return leave(self)

    def evict(self: Any, keys: Collection[Hashable]) -> None:
        self.rows = [row for row in self.rows if row.key not in keys]

    decoders.TransformersDecoder.admit = admit  # type: ignore[method-assign]
    decoders.TransformersDecoder.step = step  # type: ignore[method-assign]
    decoders.TransformersDecoder.evict = evict  # type: ignore[method-assign]


if os.environ.get(ENVIRONMENT):
    install(os.environ[ENVIRONMENT])
