"""Engines turn a batch of tokenized prompts into generations. Knows nothing of Celery or the ledger.

``TransformersEngine`` runs one batched ``generate`` with left padding and an attention mask.
Every row chooses its own next token inside a logits processor: greedy rows take the argmax,
sampled rows draw with their own seeded generator, and a row that reached its own
``max_new_tokens`` is forced to EOS. So a seeded job yields the same text alone or in any batch,
and rows with different limits share one ``generate`` call.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from textnlp_jobs.errors import ErrorCode, ModelStoreError, OutOfMemoryError, TokenizationError
from textnlp_jobs.inference.loading import QUANTIZATION_FILE
from textnlp_jobs.metrics.registry import record_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Settings that must match for two jobs to share a batch (the seed is per row)."""

    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first of these the model writes


@dataclass(frozen=True)
class EngineResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    # "stop": the model ended it (an end-of-sequence or end-of-turn token) or it wrote one of its
    # stop strings; "length": max_new_tokens cut it. None: an engine that does not tell.
    finish_reason: str | None = None

    @property
    def tokens_generated(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


class Engine(Protocol):
    """One loaded model on one device."""

    model_name: str
    model_version: str
    device: str

    def tokenize(self, prompt: str) -> list[int]: ...

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids of a chat, through the model's chat template."""
        ...

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """Run ``requests`` (same sampling settings) as one batch."""
        ...


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def choose_tokens(logits: Any, requests: Sequence[EngineRequest], generators: Sequence[Any],
                  first: Sequence[bool], stop_ids: Sequence[int], vocab_limit: int) -> tuple[Any, Any]:
    """Each row's next token and the model's log-probability of it, both ``[rows]`` tensors.

    Greedy rows take the argmax, sampled rows draw with their own generator (so a seeded row
    draws the same numbers in any batch), a row at its ``first`` step may not end at once, by any
    of the ``stop_ids`` (an empty result helps no one). The static engine and the continuous
    decoder both pick here."""
    import torch

    logits = logits.float()
    if logits.shape[-1] > vocab_limit:  # padded embedding rows are not tokens
        logits[:, vocab_limit:] = -math.inf
    log_probs = torch.log_softmax(logits, dim=-1)
    firsts = [row for row, is_first in enumerate(first) if is_first]
    if firsts:
        rows = torch.tensor(firsts, device=logits.device).unsqueeze(1)
        logits[rows, torch.tensor(stop_ids, device=logits.device)] = -math.inf
    chosen = torch.argmax(logits, dim=-1)
    for row, request in enumerate(requests):
        if not request.sampling.greedy:
            chosen[row] = _sample(logits[row], request.sampling, generators[row])
    picked = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    return chosen, picked


def _sample(logits: Any, sampling: SamplingParams, generator: Any) -> Any:
    import torch

    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


# How many of a row's last tokens are decoded to look for a stop string: its characters and some
# slack (a byte-level token can be part of a character, a special token decodes to nothing).
STOP_WINDOW_SLACK = 8


def writes_stop(tokenizer: Any, tokens: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of ``tokens`` now holds one of ``stops``. Only the tail is decoded, so a
    check per decode step costs the same at the 500th token as at the 5th."""
    width = max(len(stop) for stop in stops) + STOP_WINDOW_SLACK
    tail = str(tokenizer.decode(tokens[-width:], skip_special_tokens=True))
    return any(stop in tail for stop in stops)


def finished_result(tokenizer: Any, request: EngineRequest, tokens: list[int], logprobs: list[float], *,
                    ended: bool) -> EngineResult:
    """A finished row as the job's result, the same from static and continuous batches: its text
    cut before the first stop string (the tokens that wrote it stay counted). ``ended``: the model
    ended the row with a stop token (not among ``tokens``)."""
    # A byte-level model can emit the NUL byte, which no PostgreSQL text column stores.
    text = str(tokenizer.decode(tokens, skip_special_tokens=True)).replace("\x00", "\ufffd")
    written = [text.find(stop) for stop in request.stop if stop in text]
    if written:
        text = text[:min(written)]
    return EngineResult(text, tokens, logprobs[: len(tokens)], "stop" if ended or written else "length")


def seeded_generator(request: EngineRequest, device: Any) -> Any:
    """A sampled row's own random stream (None for greedy rows), seeded by the job's seed."""
    import torch

    if request.sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(request.seed if request.seed is not None else 0)
    return generator


class _RowwiseChooser:
    """A logits processor that picks each row's next token itself (``choose_tokens``) and
    records the model's log-probability of that token. A row past its own limit, or one that wrote
    one of its stop strings at the step before, gets EOS: generate() then counts it finished, and
    a batch whose rows have all ended stops instead of running on to the longest limit."""

    def __init__(self, requests: Sequence[EngineRequest], prompt_width: int, stop_ids: Sequence[int],
                 vocab_limit: int, device: Any, tokenizer: Any) -> None:
        self.requests = requests
        self.prompt_width = prompt_width
        self.stop_ids = stop_ids
        self.eos_id = stop_ids[0]
        self.vocab_limit = vocab_limit
        self.tokenizer = tokenizer
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.generators = [seeded_generator(request, device) for request in requests]
        # Rows with stop strings: their tokens so far; and the rows that wrote one (the EOS they are
        # given at the next step marks where their tokens end).
        self.written: dict[int, list[int]] = {row: [] for row, request in enumerate(requests) if request.stop}
        self.stopped: set[int] = set()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width
        chosen, picked = choose_tokens(scores, self.requests, self.generators, [step == 0] * len(self.requests),
                                       self.stop_ids, self.vocab_limit)
        picked_list = picked.tolist()
        chosen_list = chosen.tolist() if self.written else []
        for row, request in enumerate(self.requests):
            if step >= request.max_new_tokens or row in self.stopped:
                chosen[row] = self.eos_id
                continue
            self.logprobs[row].append(picked_list[row])
            written = self.written.get(row)
            if written is not None:
                written.append(chosen_list[row])
                if writes_stop(self.tokenizer, written, request.stop):
                    self.stopped.add(row)
        forced = torch.full_like(scores, -math.inf)
        forced.scatter_(1, chosen.unsqueeze(1), 0.0)
        return forced


class TransformersEngine:
    """A Hugging Face causal LM loaded from a local directory with ``from_pretrained``."""

    def __init__(self, model_name: str, model_version: str, path: Path, device: str = "cpu",
                 dtype: str = "auto") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import GenerationConfig

        from textnlp_jobs.inference.loading import (
            eos_token_id,
            load_model,
            load_tokenizer,
            max_positions,
            stop_token_ids,
        )

        self.model_name = model_name
        self.model_version = model_version
        self.device = device
        self._torch = torch
        self.tokenizer = load_tokenizer(path)
        # A float directory (in ``dtype``; "auto": its config's) or an int8 variant this project wrote.
        self.model = load_model(path, dtype)
        quantized = (path / QUANTIZATION_FILE).is_file()
        if quantized and not device.startswith("cpu"):
            raise ModelStoreError(f"{model_name} version {model_version} is an int8 CPU variant; "
                                  f"it cannot run on {device}")
        self.model.to(device)
        self.model.eval()
        # What the weights are in on the device (an int8 variant's linear layers hold no parameters).
        self.dtype = "int8" if quantized else str(next(self.model.parameters()).dtype).removeprefix("torch.")
        eos = eos_token_id(self.tokenizer, self.model.config)
        if eos is None:
            raise ModelStoreError(f"{model_name} version {model_version} names no end-of-sequence token")
        self.eos_id = eos
        # Every id that ends a job (a chat model's end-of-turn among them), the EOS id first.
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        # generate() fills each setting its call leaves unset from model.generation_config, so a
        # model's repetition_penalty or no_repeat_ngram_size would change static batches and not
        # continuous ones (which call forward). A job decodes with its own settings alone.
        self.model.generation_config = GenerationConfig()
        # A tokenizer without a pad token pads with EOS: padded positions are masked out anyway.
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id)
        self.vocab_limit = len(self.tokenizer)
        self.max_positions = max_positions(self.model.config) or 2048
        from textnlp_jobs.inference.decoders import why_not_row_by_row

        # Why this model cannot join a continuous batch (a sliding-window or state-space model
        # runs static), or None.
        self.static_only_reason = why_not_row_by_row(self.model)

    def tokenize(self, prompt: str) -> list[int]:
        """A plain prompt's ids, with the special tokens the tokenizer adds by default: a Llama or
        Gemma tokenizer begins every sequence with its BOS token, as the model was trained."""
        return self._encode(prompt, special_tokens=True)

    def _encode(self, text: str, *, special_tokens: bool) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=special_tokens)
        except Exception as error:  # the tokenizer's own errors vary by backend
            raise TokenizationError(f"prompt could not be tokenized: {type(error).__name__}") from error
        if not ids:
            raise TokenizationError("prompt has no tokens")
        return list(ids)

    def tokenize_many(self, prompts: Sequence[str]) -> list[list[int] | TokenizationError]:
        """``tokenize`` for many prompts in one call of the tokenizer: a fast tokenizer encodes the
        batch in Rust without holding the GIL, so the decode loop beside it keeps running (one
        prompt at a time, the Python around each encode held the GIL about 45 µs per job). A prompt
        it cannot tokenize gets its own error; the others are unaffected."""
        if len(prompts) < 2:
            return [self._tokenize_or_error(prompt) for prompt in prompts]
        try:
            backend = self._plain_backend()
            if backend is not None:
                encoded = [encoding.ids for encoding in backend.encode_batch(list(prompts), add_special_tokens=True)]
            else:
                encoded = self.tokenizer(list(prompts), add_special_tokens=True, return_attention_mask=False,
                                         return_token_type_ids=False)["input_ids"]
        except Exception:  # one prompt the tokenizer refuses: find it, one by one
            return [self._tokenize_or_error(prompt) for prompt in prompts]
        return [list(ids) if len(ids) else TokenizationError("prompt has no tokens") for ids in encoded]

    def _plain_backend(self) -> Any:
        """The fast tokenizer's Rust backend, when calling it directly gives what the transformers
        call gives: transformers' generic encoding (no model-specific override of it), no
        truncation or padding configured on the backend and special tokens handled the same way.
        transformers then only converts each encoding to a dict, in Python, holding the GIL (about
        15 µs a prompt on the development machine, taken from the decode loop beside it). None
        otherwise (a slow tokenizer, a model's own encoding, one configured differently)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        cls = type(self.tokenizer)
        if not all(getattr(getattr(cls, name, None), "__module__", "").startswith("transformers.tokenization_utils")
                   for name in ("__call__", "_encode_plus")):
            return None
        if bool(getattr(self.tokenizer, "split_special_tokens", False)) != bool(backend.encode_special_tokens):
            return None
        return backend

    def _tokenize_or_error(self, prompt: str) -> list[int] | TokenizationError:
        try:
            return self.tokenize(prompt)
        except TokenizationError as error:
            return error

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TokenizationError(f"model {self.model_name} version {self.model_version} has no chat template",
                                    code=ErrorCode.INPUT_NO_CHAT_TEMPLATE)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja errors from a template that rejects these messages
            raise TokenizationError(f"chat template failed: {type(error).__name__}: {error}") from error
        # The template writes the special tokens it wants (a BOS among them): none are added.
        return self._encode(str(text), special_tokens=False)

    def warm_up(self) -> None:
        """One tiny generation so the first job does not pay for lazy initialisation."""
        self.generate([EngineRequest(self.tokenize("Warm up"), 2, SamplingParams())])

    def generator_for(self, request: EngineRequest) -> Any:
        return seeded_generator(request, self.device)

    def decoder(self) -> Any:
        """A running batch for continuous batching (``decoders.TransformersDecoder``)."""
        from textnlp_jobs.inference.decoders import TransformersDecoder

        return TransformersDecoder(self)

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        from transformers import GenerationConfig, LogitsProcessorList

        torch = self._torch
        width = max(len(r.prompt_ids) for r in requests)
        longest = max(r.max_new_tokens for r in requests)
        if width + longest > self.max_positions:
            raise TokenizationError(f"prompt of {width} tokens + {longest} new exceeds the model's "
                                    f"{self.max_positions} positions")
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):  # left padding: the prompt ends where generation starts
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids):] = 1
        chooser = _RowwiseChooser(requests, width, self.stop_ids, self.vocab_limit, self.device, self.tokenizer)
        config = GenerationConfig(max_new_tokens=longest, do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=list(self.stop_ids), bos_token_id=self.eos_id)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                    generation_config=config, logits_processor=LogitsProcessorList([chooser]),
                )
        except Exception as error:
            if is_out_of_memory(error):
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(f"out of memory at batch {len(requests)}") from error
            raise
        record_memory(self.device)
        results = []
        for row, request in enumerate(requests):
            new = output[row, width:].tolist()[: request.max_new_tokens]
            # A stop token: the model's own, or the EOS a row that wrote its stop string was given.
            end = next((i for i, token in enumerate(new) if token in self.stop_ids), None)
            if end is not None:
                new = new[:end]
            results.append(finished_result(self.tokenizer, request, new, chooser.logprobs[row], ended=end is not None))
        return results


class StubEngine:
    """A deterministic engine with no model: text is the prompt's words reversed, one token per
    word. For unit tests of the batching loop; ``fail_above`` simulates out-of-memory."""

    def __init__(self, model_name: str = "stub", *, fail_above: int | None = None, step_seconds: float = 0.0) -> None:
        self.model_name = model_name
        self.step_seconds = step_seconds
        self.model_version = "stub-1"
        self.device = "cpu"
        self.fail_above = fail_above
        self.batches: list[int] = []

    def tokenize(self, prompt: str) -> list[int]:
        if "\x00" in prompt:
            raise TokenizationError("prompt contains NUL")
        return [len(word) for word in prompt.split()] or [0]

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize(" ".join(f"{m['role']}: {m['content']}" for m in messages))

    def decoder(self) -> Any:
        from textnlp_jobs.inference.decoders import StubDecoder

        return StubDecoder(self.fail_above, self.batches, self.step_seconds)

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        if self.fail_above is not None and len(requests) > self.fail_above:
            raise OutOfMemoryError(f"stub out of memory at batch {len(requests)}")
        self.batches.append(len(requests))
        out = []
        for request in requests:
            ids = list(reversed(request.prompt_ids))[: request.max_new_tokens]
            out.append(EngineResult(" ".join(map(str, ids)), ids, [-1.0] * len(ids)))
        return out
