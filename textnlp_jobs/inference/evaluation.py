"""Measuring a model on the CPU: perplexity on the held-out set, generation speed, size on disk,
and the gate a quantized variant must pass against its source before it is registered."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from textnlp_jobs.inference.heldout import HELDOUT_TEXTS, prompt_openings
from textnlp_jobs.inference.loading import eos_token_id, load_model, load_tokenizer, max_positions
from textnlp_jobs.inference.store import directory_size

GATE_BATCHES = (1, 8)
GATE_NEW_TOKENS = 32
GATE_REPEATS = 3


def perplexity(model: Any, tokenizer: Any, texts: tuple[str, ...] = HELDOUT_TEXTS) -> float:
    """exp of the mean next-token loss over every held-out text (each truncated to the model's
    positions). A model whose output is not finite scores infinity."""
    import torch

    limit = max_positions(model.config) or 1024
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer.encode(text)[:limit]
            if len(ids) < 2:
                continue
            tensor = torch.tensor([ids])
            loss = model(input_ids=tensor, labels=tensor).loss.item()
            if not math.isfinite(loss):
                return math.inf
            total += loss * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(total / count) if count else math.inf


def tokens_per_second(model: Any, tokenizer: Any, batch: int, new_tokens: int = GATE_NEW_TOKENS) -> float:
    """Greedy generation of exactly ``new_tokens`` per row from held-out openings, left padded."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id(tokenizer, model.config)
    rows = [tokenizer.encode(p) for p in prompt_openings(batch)]
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), int(pad or 0), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=int(pad or 0))
        elapsed = time.perf_counter() - started
    return batch * new_tokens / elapsed


@dataclass
class Figures:
    size_bytes: int
    perplexity: float
    tokens_per_second: dict[int, float] = field(default_factory=dict)


@dataclass
class GateReport:
    """Source and variant side by side, and whether the variant earned its place."""

    source: Figures
    variant: Figures
    max_perplexity_increase: float
    min_speedup: float
    reasons: list[str] = field(default_factory=list)

    @property
    def perplexity_delta(self) -> float:
        """Relative change of perplexity, variant against source (0.02 = 2% worse)."""
        if not math.isfinite(self.variant.perplexity):
            return math.inf
        return self.variant.perplexity / self.source.perplexity - 1.0

    def speedup(self, batch: int) -> float:
        return self.variant.tokens_per_second[batch] / self.source.tokens_per_second[batch]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        def finite(value: float) -> float | None:
            return round(value, 6) if math.isfinite(value) else None

        return {
            "passed": self.passed, "reasons": self.reasons,
            "source": {**asdict(self.source), "perplexity": finite(self.source.perplexity)},
            "variant": {**asdict(self.variant), "perplexity": finite(self.variant.perplexity)},
            "perplexity_delta": finite(self.perplexity_delta),
            "speedup": {str(b): round(self.speedup(b), 3) for b in self.source.tokens_per_second},
            "size_ratio": round(self.variant.size_bytes / self.source.size_bytes, 4),
            "max_perplexity_increase": self.max_perplexity_increase, "min_speedup": self.min_speedup,
        }


def judge(report: GateReport) -> GateReport:
    """Fill ``report.reasons`` with every rule the variant breaks."""
    report.reasons.clear()
    if not report.perplexity_delta <= report.max_perplexity_increase:  # NaN and inf fail too
        report.reasons.append(f"perplexity {report.variant.perplexity:.3f} vs {report.source.perplexity:.3f} "
                              f"(+{report.perplexity_delta:.1%} > +{report.max_perplexity_increase:.0%})")
    for batch in report.source.tokens_per_second:
        if not report.speedup(batch) >= report.min_speedup:
            report.reasons.append(f"tokens/s at batch {batch} only {report.speedup(batch):.2f}x the source "
                                  f"(< {report.min_speedup:.2f}x)")
    if not report.variant.size_bytes < report.source.size_bytes:
        report.reasons.append(f"not smaller on disk ({report.variant.size_bytes} >= {report.source.size_bytes} bytes)")
    return report


def evaluate(source: Path, variant: Path, *, max_perplexity_increase: float, min_speedup: float,
             batches: tuple[int, ...] = GATE_BATCHES, repeats: int = GATE_REPEATS,
             new_tokens: int = GATE_NEW_TOKENS) -> GateReport:
    """Load both from disk, as a worker would, and compare them. Speed is the best of ``repeats``
    runs, source and variant alternating, so a busy machine slows both alike."""
    tokenizer = load_tokenizer(source)
    models = {"source": load_model(source), "variant": load_model(variant)}
    figures = {side: Figures(directory_size(path), perplexity(models[side], tokenizer))
               for side, path in (("source", source), ("variant", variant))}
    for batch in batches:
        for side in models:  # warm-up: the first call pays for lazy initialisation
            tokens_per_second(models[side], tokenizer, batch, new_tokens=2)
        for _ in range(repeats):
            for side, model in models.items():
                rate = tokens_per_second(model, tokenizer, batch, new_tokens)
                figures[side].tokens_per_second[batch] = max(rate, figures[side].tokens_per_second.get(batch, 0.0))
    return judge(GateReport(figures["source"], figures["variant"], max_perplexity_increase, min_speedup))
