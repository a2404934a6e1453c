#!/usr/bin/env python
"""The continuous decoder's KV cache: layers with room to spare against transformers' own.

    python bench/kv_cache.py --model small --jobs 256 --batches 32,128 --torch-threads 1
    python bench/kv_cache.py --model small --jobs 512 --batches 128 --device cuda.0

transformers' ``DynamicLayer`` grows by ``torch.cat`` (a new tensor and a copy of the whole
layer's cache on every decode step); this project's decoder keeps each layer in buffers with room
for its rows' remaining tokens and writes each step's column in place (``decoders.roomy_layer``).
For each batch size and workload (uniform ``--max-new-tokens``; mixed, drawn in
``--max-new-tokens-range``) it runs the direct continuous decoder of ``bench/throughput.py`` on the
same prompts with each kind of cache, alternated (plain, roomy, plain, roomy), checks both give
the same tokens, and prints tokens/s, the mean decode step and roomy ÷ plain (best of each kind).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # bench/throughput.py, beside this file
from throughput import say


class PlainCacheEngine:
    """The same engine whose decoders use transformers' own cache layers."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def decoder(self) -> Any:
        from textnlp_jobs.inference.decoders import TransformersDecoder

        return TransformersDecoder(self._engine, roomy_cache=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="a bench model (built once into bench/.models)")
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--batches", default="32,128", help="the decoder's max_batch, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens-range", default="8:128", help="LO:HI for the mixed workload; empty skips it")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu.0", help="cpu.0 or cuda.N")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternated")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from textnlp_jobs.inference.engine import TransformersEngine

    version, path = throughput.ensure_model(args.model)
    engine = TransformersEngine(args.model, version, path, device=throughput.torch_device(args.device))
    plain = PlainCacheEngine(engine)
    prompt_ids = [engine.tokenize(p) for p in throughput.make_prompts(args.jobs)]
    workloads: dict[str, list[int]] = {"uniform": throughput.make_limits(args.jobs, args.max_new_tokens, None, 0)}
    if args.max_new_tokens_range:
        low, _, high = args.max_new_tokens_range.partition(":")
        workloads["mixed"] = throughput.make_limits(args.jobs, 0, (int(low), int(high or low)), args.seed)
    info = throughput.machine(args.device)
    say(f"{info['device_name']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"{torch.get_num_threads()} torch threads; model {args.model} ({version}), {args.jobs} jobs")
    print(f"\n  {'workload':<9}{'batch':>6}{'cache':>7}{'tok/s (each run)':>30}{'roomy / plain (best)':>22}")
    for batch in sorted({int(b) for b in args.batches.split(",") if b.strip()}):
        for workload, limits in workloads.items():
            best: dict[str, float] = {}
            tokens: dict[str, list[int]] = {}
            for _ in range(args.repeats):
                for kind, subject in (("plain", plain), ("roomy", engine)):
                    figures = throughput.run_direct_continuous(subject, prompt_ids, batch, limits)
                    best[kind] = max(best.get(kind, 0.0), figures["tokens_per_s"])
                    tokens.setdefault(kind, []).append(figures["tokens_per_s"])
                    step = figures["loop"]["phases"].get("step", {}).get("mean_ms", float("nan"))
                    say(f"{workload} B={batch} {kind}: {figures['tokens_per_s']:,.1f} tok/s, step {step:.1f} ms")
            for kind in ("plain", "roomy"):
                runs = " / ".join(f"{t:,.0f}" for t in tokens[kind])
                ratio = f"{best['roomy'] / best['plain']:.3f}" if kind == "roomy" else ""
                print(f"  {workload:<9}{batch:>6}{kind:>7}{runs:>30}{ratio:>22}")
    same = same_tokens(engine, plain, prompt_ids[: min(32, args.jobs)], workloads)
    print(f"\n  same greedy tokens with either cache: {same}")
    return 0 if same else 1


def same_tokens(engine: Any, plain: Any, prompt_ids: list[list[int]], workloads: dict[str, list[int]]) -> bool:
    from textnlp_jobs.inference.continuous import ContinuousBatcher
    from textnlp_jobs.inference.engine import EngineRequest, SamplingParams
    from textnlp_jobs.settings import BatchingPolicy

    limits = workloads.get("mixed") or workloads["uniform"]
    requests = [EngineRequest(ids, n, SamplingParams()) for ids, n in zip(prompt_ids, limits, strict=False)]
    outputs = []
    for subject in (plain, engine):
        # Fewer rows than jobs, so rows leave, newcomers join and the cache is merged and compacted.
        batcher = ContinuousBatcher({engine.model_name: subject},
                                    lambda _: BatchingPolicy(max_batch=8, max_wait_ms=0, mode="continuous"))
        batcher.start()
        try:
            futures = [batcher.submit(i, engine.model_name, r) for i, r in enumerate(requests)]
            outputs.append([f.result().result.token_ids for f in futures])
        finally:
            batcher.stop()
    return outputs[0] == outputs[1]


if __name__ == "__main__":
    sys.exit(main())
