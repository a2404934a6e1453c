#!/usr/bin/env python
"""int8 dynamic quantization of a model against its float source, on the CPU.

    python bench/quantize.py                       # builds `small` into bench/.models/ once
    python bench/quantize.py --source PATH --repeats 5 --torch-threads 2

Quantizes the source exactly as the ``models.quantize`` maintenance task does, saves the variant,
loads both back from disk (a fresh load, as a worker would) and prints size on disk, perplexity on
the held-out text set (``textnlp_jobs/inference/heldout.py``), and greedy tokens/s at batch 1 and 8
(best of ``--repeats``, source and variant alternating), then the gate's verdict with the default
thresholds. The last line is ``BENCH_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_ROOT = REPO / "bench" / ".models"


def gate_defaults() -> dict[str, float]:
    """The gate's thresholds from the settings' defaults; a bare GPU machine has no pydantic-settings,
    so there the same defaults are read from settings.py's source text."""
    try:
        from textnlp_jobs.settings import Settings
    except ImportError:
        import re

        text = (REPO / "textnlp_jobs" / "settings.py").read_text()

        def default(field: str) -> float:
            match = re.search(rf"{field}: float = Field\(([0-9.]+)", text)
            assert match, field
            return float(match.group(1))

        return {"max_perplexity_increase": default("quantize_max_perplexity_increase"),
                "min_speedup": default("quantize_min_speedup")}
    settings = Settings()
    return {"max_perplexity_increase": settings.quantize_max_perplexity_increase,
            "min_speedup": settings.quantize_min_speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=None, help="a float model directory (default: small)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from textnlp_jobs.inference import evaluation, quantize
    from textnlp_jobs.inference.bootstrap import build_model
    from textnlp_jobs.inference.loading import load_model

    limits = gate_defaults()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    source = args.source
    if source is None:
        source = MODEL_ROOT / "small-quantize-source"
        if not (source / "config.json").is_file():
            print("building small (random weights) into", source, flush=True)
            build_model("small", source)
    with tempfile.TemporaryDirectory(prefix="textnlp-quantize-") as scratch:
        started = time.perf_counter()
        model, record = quantize.quantize_model(load_model(source))
        variant = quantize.save_quantized(model, record, source, Path(scratch) / "variant")
        build_seconds = time.perf_counter() - started
        del model
        report = evaluation.evaluate(source, variant, max_perplexity_increase=limits["max_perplexity_increase"],
                                     min_speedup=limits["min_speedup"], repeats=args.repeats,
                                     new_tokens=args.new_tokens)
    figures = report.as_dict()
    print(f"\n{'':24}{'source (fp32)':>16}{'int8-dynamic':>16}{'ratio':>10}")
    print(f"{'size on disk (MB)':24}{report.source.size_bytes / 1e6:16.1f}{report.variant.size_bytes / 1e6:16.1f}"
          f"{figures['size_ratio']:10.3f}")
    print(f"{'perplexity (held-out)':24}{report.source.perplexity:16.3f}{report.variant.perplexity:16.3f}"
          f"{report.perplexity_delta:+10.2%}")
    for batch in evaluation.GATE_BATCHES:
        print(f"{f'tok/s batch {batch}':24}{report.source.tokens_per_second[batch]:16.1f}"
              f"{report.variant.tokens_per_second[batch]:16.1f}{report.speedup(batch):10.2f}x")
    verdict = "PASS" if report.passed else "REJECT: " + "; ".join(report.reasons)
    print(f"\ngate (perplexity <= +{limits['max_perplexity_increase']:.0%}, speed >= "
          f"{limits['min_speedup']}x at batch 1 and 8, smaller): {verdict}")
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    print("BENCH_RESULT " + json.dumps({"source": str(source), "build_seconds": round(build_seconds, 2),
                                        "repeats": args.repeats, "new_tokens": args.new_tokens, **figures,
                                        "machine": machine}))


if __name__ == "__main__":
    main()
