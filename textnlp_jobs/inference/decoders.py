"""Iteration-level decoders: a running batch that rows join and leave between decode steps.

``TransformersDecoder`` keeps one left-padded KV cache (a ``DynamicCache``) for all its rows.
``admit`` prefills the new rows as one batch and merges their cache into the running one (the
shorter side is padded on the left, so each row stays "left padding, then its own tokens");
``step`` runs one decode step for every row; a row that reached EOS or its own
``max_new_tokens`` leaves at once, and columns that only padding still uses are trimmed away.
Each layer's keys and values live in buffers with room for the rows' remaining tokens
(``roomy_layer``), so a step writes its one new column in place: transformers' own layer copies
the whole cache into a new tensor every step, a sixth to a fifth of a 128-row decode step of
``small`` on the CPU with a mixed workload (``bench/kv_cache.py``).
Every row picks its own token exactly as the static engine does (``engine.choose_tokens``):
greedy rows the argmax, sampled rows draw with their own seeded generator, each row's
log-probability is the model's own. So per-job sampling settings share one batch and a seeded
job draws the same numbers whatever batch it rides in.

Why not transformers' ``ContinuousBatchingManager``: its sampling is one ``do_sample`` for the
whole manager with one global RNG seed (no per-request seed, so a seeded job's text would depend
on its neighbours), its log-probabilities are those after temperature/top-k (not the model's),
and its API changed between the 5.17 on the GPU machine and the 5.24–5.25 here. It stays in
bench/throughput.py as a direct baseline.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from textnlp_jobs.errors import OutOfMemoryError, TokenizationError
from textnlp_jobs.inference.engine import (
    EngineRequest,
    EngineResult,
    TransformersEngine,
    choose_tokens,
    finished_result,
    is_out_of_memory,
    writes_stop,
)

Finished = list[tuple[Hashable, EngineResult]]


class Decoder(Protocol):
    """One model's running batch."""

    def __len__(self) -> int: ...

    def admit(self, rows: Sequence[tuple[Hashable, EngineRequest]]) -> Finished:
        """Prefill ``rows`` and add them to the running batch; returns rows already done."""
        ...

    def step(self) -> Finished:
        """One decode step for every row; returns (and removes) the rows that finished."""
        ...

    def evict(self, keys: Collection[Hashable]) -> None:
        """Remove rows (cancelled, overdue, given back) without a result."""
        ...

    def keys(self) -> list[Hashable]: ...


def why_not_row_by_row(model: Any) -> str | None:
    """Why ``TransformersDecoder`` cannot run ``model`` (None when it can).

    The decoder merges running batches' caches row-wise, left-pads them and trims columns, which
    is right only for full-attention key/value caches. A sliding-window or chunked layer rolls its
    cache; a state-space layer (Mamba, the Mamba layers of Jamba) holds a recurrent state, not keys
    and values: every job of such a model would fail in the decoder, so it runs static. Each test
    covers the transformers releases that describe it that way (``_is_stateful`` before 5.x
    dropped it, the kinds of layer ``DynamicCache(config=...)`` builds since)."""
    if getattr(model, "_is_stateful", False):
        return "stateful_model"
    text_config = model.config.get_text_config()
    if getattr(text_config, "sliding_window", None) or getattr(text_config, "attention_chunk_size", None):
        return "sliding_window"
    accepts = inspect.signature(model.forward).parameters
    if "cache" not in accepts and "past_key_values" not in accepts:
        return "no_key_value_cache"
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before 5: no cache layers to inspect
        return None
    try:
        layers = getattr(DynamicCache(config=model.config), "layers", None) or []
    except Exception as error:  # a config the cache cannot read cannot be decoded row by row either
        return f"cache_config_{type(error).__name__}"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    return f"cache_layers_{'+'.join(odd)}" if odd else None


@functools.cache
def roomy_layer() -> type | None:
    """transformers' ``DynamicLayer`` with room to spare (None where it has no such class).

    ``DynamicLayer.update`` returns ``torch.cat([cached, new])``: every decode step copies every
    layer's whole cache into freshly allocated memory. This layer keeps its keys and values as the
    first columns of buffers allocated with ``room`` more columns than they first hold, so an
    update writes into the buffer and returns a view of it. A buffer that fills up (or keys that
    something replaced) is moved to a new one with a quarter more room."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before 5: key_cache / value_cache lists, left as they are
        return None

    class RoomyLayer(DynamicLayer):
        room = 0  # columns beyond the first update's, reserved when its buffers are allocated
        _keys_buffer: Any = None
        _values_buffer: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cached: Any = self.keys
            length = cached.shape[-2] if cached.numel() else 0
            needed = length + key_states.shape[-2]
            buffer = self._keys_buffer
            if (buffer is None or needed > buffer.shape[-2] or buffer.shape[0] != key_states.shape[0]
                    or (length and cached.data_ptr() != buffer.data_ptr())):
                extra = self.room if buffer is None else max(16, needed // 4)
                self._keys_buffer = self._moved(cached, length, needed + extra, key_states)
                self._values_buffer = self._moved(self.values, length, needed + extra, value_states)
            self._keys_buffer[:, :, length:needed] = key_states
            self._values_buffer[:, :, length:needed] = value_states
            self.keys = self._keys_buffer[:, :, :needed]
            self.values = self._values_buffer[:, :, :needed]
            return self.keys, self.values

        @staticmethod
        def _moved(cached: Any, length: int, capacity: int, like: Any) -> Any:
            buffer = like.new_empty((like.shape[0], like.shape[1], capacity, like.shape[3]))
            if length:
                buffer[:, :, :length] = cached
            return buffer

    return RoomyLayer


@dataclass
class _Row:
    key: Hashable
    request: EngineRequest
    generator: Any
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False  # left the batch; its tensor row stays (masked, idle) until compaction


class TransformersDecoder:
    """The running batch of one ``TransformersEngine`` (see the module docstring)."""

    def __init__(self, engine: TransformersEngine, *, roomy_cache: bool = True) -> None:
        import torch

        self.engine = engine
        # False: transformers' own layers, which copy the cache every step (bench/kv_cache.py's baseline).
        self.roomy = roomy_layer() if roomy_cache else None
        self.torch = torch
        self.rows: list[_Row] = []
        self.cache: Any = None  # a DynamicCache, per layer keys/values [rows, heads, T, dim]
        self.mask: Any = None  # [rows, T]: 1 where the cache holds a real token
        self.last: Any = None  # [rows]: each row's newest token, not yet in the cache
        self.positions: Any = None  # [rows]: that token's position
        self.alive: Any = None  # [rows]: 1 for a row still decoding, 0 for one that left
        # A prefill uses only the last position's logits: where the model's forward can, its LM head
        # skips the rest of the prompt (half the time of a 128-row start on the CPU).
        accepts = inspect.signature(engine.model.forward).parameters
        self.prefill_options = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        # transformers 5.25 renamed the forward's ``past_key_values`` to ``cache``: the old name
        # still works there with a FutureWarning and is to be removed in 5.40 (earlier 5.x, such
        # as the GPU machine's, know only the old one).
        self.cache_keyword = "cache" if "cache" in accepts else "past_key_values"

    def __len__(self) -> int:
        return sum(1 for row in self.rows if not row.done)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows if not row.done]

    def admit(self, rows: Sequence[tuple[Hashable, EngineRequest]]) -> Finished:
        torch = self.torch
        engine = self.engine
        for _, request in rows:
            if len(request.prompt_ids) + request.max_new_tokens > engine.max_positions:
                raise TokenizationError(f"prompt of {len(request.prompt_ids)} tokens + {request.max_new_tokens} "
                                        f"new exceeds the model's {engine.max_positions} positions")
        width = max(len(request.prompt_ids) for _, request in rows)
        input_ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, request) in enumerate(rows):
            input_ids[i, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[i, width - len(request.prompt_ids):] = 1
        input_ids, mask = input_ids.to(engine.device), mask.to(engine.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        new = [_Row(key, request, engine.generator_for(request)) for key, request in rows]
        # Starting a batch, this cache becomes the running one: room for the longest newcomer.
        # Joining one, it is merged into a new cache (below) and needs none.
        cache = self._new_cache(room=0 if len(self) else self._room(new))
        with self._guard(len(rows)), torch.inference_mode():
            output = engine.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                  use_cache=True, **{self.cache_keyword: cache}, **self.prefill_options)
            chosen = self._choose(output.logits[:, -1, :], new)
        if any(row.done for row in self.rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.done])
        alive = torch.ones_like(chosen)
        if self.rows:
            # The merged cache (with its room) is the largest allocation of a join: out of memory
            # here is ours too, so the newcomers are split or wait rather than fail.
            with self._guard(len(self.rows) + len(new)):
                layers, mask = self._merge(self._layers_of(cache), mask)
                cache = self._new_cache(layers, room=self._room(self.rows + new))
            self.last = torch.cat([self.last, chosen])
            self.positions = torch.cat([self.positions, positions[:, -1] + 1])
            self.alive = torch.cat([self.alive, alive])
        else:
            self.last, self.positions, self.alive = chosen, positions[:, -1] + 1, alive
        self.cache, self.mask = cache, mask
        self.rows.extend(new)
        return self._leave()

    def step(self) -> Finished:
        if not len(self):
            return []
        torch = self.torch
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with self._guard(len(self.rows)), torch.inference_mode():
            # The cache grows in place by one column per layer, as in generate().
            output = self.engine.model(input_ids=self.last.unsqueeze(1), attention_mask=mask,
                                       position_ids=self.positions.unsqueeze(1), use_cache=True,
                                       **{self.cache_keyword: self.cache})
            self.last = self._choose(output.logits[:, -1, :], self.rows)
        self.mask = mask
        self.positions = self.positions + self.alive  # a row that left stays put (within its positions)
        return self._leave()

    def evict(self, keys: Collection[Hashable]) -> None:
        self._retire([i for i, row in enumerate(self.rows) if not row.done and row.key in keys])

    # --- internals ---------------------------------------------------------------------------
    def _choose(self, logits: Any, rows: Sequence[_Row]) -> Any:
        first = [not row.tokens for row in rows]
        chosen, picked = choose_tokens(logits, [row.request for row in rows], [row.generator for row in rows],
                                       first, self.engine.stop_ids, self.engine.vocab_limit)
        for row, token, logprob in zip(rows, chosen.tolist(), picked.tolist(), strict=True):
            if not row.done:
                row.tokens.append(token)
                row.logprobs.append(logprob)
        return chosen

    def _leave(self) -> Finished:
        stops = self.engine.stop_ids
        done: Finished = []
        leaving = []
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            ended = row.tokens[-1] in stops
            if (ended or len(row.tokens) >= row.request.max_new_tokens
                    or (row.request.stop and writes_stop(self.engine.tokenizer, row.tokens, row.request.stop))):
                tokens = row.tokens[:-1] if ended else row.tokens
                done.append((row.key, finished_result(self.engine.tokenizer, row.request, tokens, row.logprobs,
                                                      ended=ended)))
                leaving.append(i)
        self._retire(leaving)
        return done

    def _retire(self, indices: list[int]) -> None:
        """Rows leave at once; their tensor rows are dropped in bulk (a quarter of the batch, or
        at the next admission), since every compaction copies the whole cache."""
        if not indices:
            return
        for i in indices:
            self.rows[i].done = True
        self.alive[indices] = 0
        dead = sum(1 for row in self.rows if row.done)
        if dead * 4 >= len(self.rows):
            try:
                self._keep([i for i, row in enumerate(self.rows) if not row.done])
            except OutOfMemoryError:  # compaction only saves work: the dead rows wait for the next one
                pass

    def _keep(self, keep: list[int]) -> None:
        """Only rows ``keep`` stay: the cache is copied without the others (all or nothing, so an
        out-of-memory error leaves the batch as it was)."""
        kept = [self.rows[i] for i in keep]
        if not keep:
            self.rows = kept
            self.cache, self.mask, self.last, self.positions, self.alive = None, None, None, None, None
            return
        with self._guard(len(keep)):
            index = self.torch.tensor(keep, device=self.mask.device)
            mask = self.mask.index_select(0, index)
            # Columns every remaining row has as padding are dead weight: trim them from the left.
            used = mask.any(dim=0).nonzero()
            start = int(used[0]) if used.numel() else mask.shape[1]
            cache = self._new_cache([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                                     for k, v in self._layers_of(self.cache)], room=self._room(kept))
            last, positions, alive = (t.index_select(0, index) for t in (self.last, self.positions, self.alive))
        self.rows, self.cache, self.mask = kept, cache, mask[:, start:]
        self.last, self.positions, self.alive = last, positions, alive

    def _merge(self, new_layers: list[tuple[Any, Any]], new_mask: Any) -> tuple[list[tuple[Any, Any]], Any]:
        torch = self.torch
        width = max(self.mask.shape[1], new_mask.shape[1])

        def pad(tensor: Any, dim: int) -> Any:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)

        layers = [(torch.cat([pad(k, 2), pad(nk, 2)]), torch.cat([pad(v, 2), pad(nv, 2)]))
                  for (k, v), (nk, nv) in zip(self._layers_of(self.cache), new_layers, strict=True)]
        return layers, torch.cat([pad(self.mask, 1), pad(new_mask, 1)])

    def _new_cache(self, layers: Sequence[tuple[Any, Any]] = (), *, room: int = 0) -> Any:
        """A cache holding ``layers`` (none: for a prefill), each plain layer with ``room`` columns to
        spare for the decode steps ahead (``roomy_layer``)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.engine.model.config)
        roomy = self.roomy
        plain = getattr(cache, "layers", None)
        if roomy is not None and plain is not None:
            for index, layer in enumerate(plain):
                if type(layer) is roomy.__base__:  # sliding-window and other layers keep their own kind
                    plain[index] = roomy()
                    plain[index].room = room
        for index, (k, v) in enumerate(layers):
            cache.update(k, v, index)
        return cache

    @staticmethod
    def _room(rows: Sequence[_Row]) -> int:
        """Cache columns the decode steps ahead add at most: one per token a live row may still take."""
        return max((row.request.max_new_tokens - len(row.tokens) for row in rows if not row.done), default=0)

    @staticmethod
    def _layers_of(cache: Any) -> list[tuple[Any, Any]]:
        layers = getattr(cache, "layers", None)
        if layers is None:  # older transformers: key_cache / value_cache lists
            return list(zip(cache.key_cache, cache.value_cache, strict=True))
        return [(layer.keys, layer.values) for layer in layers]

    def _guard(self, rows: int) -> _OomGuard:
        return _OomGuard(self.engine, rows)


class _OomGuard:
    """Turns the device's out-of-memory error into ours (and frees the allocator's cache)."""

    def __init__(self, engine: TransformersEngine, rows: int) -> None:
        self.engine = engine
        self.rows = rows

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> None:
        if error is not None and not isinstance(error, OutOfMemoryError) and is_out_of_memory(error):
            if self.engine.device.startswith("cuda"):
                self.engine._torch.cuda.empty_cache()
            raise OutOfMemoryError(f"out of memory with {self.rows} rows") from error


class StubDecoder:
    """The stub engine's running batch: each step emits the next of the prompt's ids reversed (the
    stub engine's text). ``fail_above`` rows raise out-of-memory, as the stub engine's batches
    do; ``batches`` records the running rows after each admission; ``step_seconds`` slows steps."""

    def __init__(self, fail_above: int | None = None, batches: list[int] | None = None,
                 step_seconds: float = 0.0) -> None:
        self.fail_above = fail_above
        self.rows: list[_Row] = []
        self.batches = batches if batches is not None else []  # running rows after each admission
        self.step_seconds = step_seconds

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows]

    def admit(self, rows: Sequence[tuple[Hashable, EngineRequest]]) -> Finished:
        if self.fail_above is not None and len(self.rows) + len(rows) > self.fail_above:
            raise OutOfMemoryError(f"stub out of memory at {len(self.rows) + len(rows)} rows")
        self.rows.extend(_Row(key, request, None) for key, request in rows)
        self.batches.append(len(self.rows))
        return self.step()

    def step(self) -> Finished:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        done: Finished = []
        for row in self.rows:
            source = list(reversed(row.request.prompt_ids))
            row.tokens.append(source[len(row.tokens) % len(source)])
            row.logprobs.append(-1.0)
        keep = []
        for row in self.rows:
            if len(row.tokens) >= min(row.request.max_new_tokens, len(row.request.prompt_ids)):
                done.append((row.key, EngineResult(" ".join(map(str, row.tokens)), row.tokens, row.logprobs)))
            else:
                keep.append(row)
        self.rows = keep
        return done

    def evict(self, keys: Collection[Hashable]) -> None:
        self.rows = [row for row in self.rows if row.key not in keys]
