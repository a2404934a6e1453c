"""Which dtype decodes a model fastest on this device: direct static batches, float32 first.

    python bench/dtype.py --model small                  # a bench model (built once, as throughput.py does)
    python bench/dtype.py --path /models/mine --device cuda.0 --dtypes float32,bfloat16

Prints tokens/s per dtype and its ratio to float32 measured in the same process, to choose a
model's ``TEXTNLP_DTYPE`` by. Short on purpose: a dtype the device emulates can run tens of
times slower than float32 (bfloat16 on a CPU without avx512_bf16), so each run is a few tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # bench/throughput.py, beside this file

PROMPTS = ["Return a new list of the values", "Read the file and return", "The number of seconds since"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="a bench model (demo, small, ...), unless --path")
    parser.add_argument("--path", type=Path, default=None, help="a model directory of your own")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--device", default="cpu.0", help="cpu.0 or cuda.N")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
    from textnlp_jobs.inference.loading import emulated_on_this_cpu

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = throughput.torch_device(args.device)
    path = args.path or throughput.ensure_model(args.model)[1]
    info = throughput.machine(args.device)
    print(f"{info['device_name']}, torch {info['torch']}, {info['torch_threads']} torch threads, model {path}")
    baseline = None
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        engine = TransformersEngine("bench", "v", path, device, dtype)
        requests = [EngineRequest(engine.tokenize(PROMPTS[i % len(PROMPTS)]), args.max_new_tokens, SamplingParams())
                    for i in range(args.batch)]
        engine.generate(requests[:2])  # warm up
        started = time.perf_counter()
        results = engine.generate(requests)
        seconds = time.perf_counter() - started
        rate = sum(len(result.token_ids) for result in results) / seconds
        baseline = baseline or rate
        note = "  (this CPU has no instructions for it)" if device == "cpu" and emulated_on_this_cpu(dtype) else ""
        print(f"  {engine.dtype:9s} batch {args.batch} x {args.max_new_tokens} tokens: {rate:9.1f} tok/s  "
              f"{rate / baseline:6.2f}x the first{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
