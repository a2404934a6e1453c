#!/usr/bin/env python
"""Throughput and latency of the job system against the engine's own limit.

    python bench/throughput.py --model demo --jobs 64 --batch 16 --unbatched-jobs 16 --latency-seconds 5
    python bench/throughput.py --model small --jobs 512 --batch 32 --device cuda.0 --embedded

For each model it measures, on the same N greedy prompts with a fixed ``max_new_tokens``:

1. direct: ``TransformersEngine.generate`` in this process, batches of B (the limit), and at
   batch 1 on the first M prompts;
2. system, batched: a scratch stack (PostgreSQL + Redis, or with ``--embedded`` SQLite + the
   folder broker) with ONE real device worker subprocess, ``max_batch=B``; all N jobs are
   submitted with ``submit_many`` and waited for; tokens come from the ledger;
3. latency: on the same worker, jobs submitted one at a time at about half of the batched job
   capacity measured in step 2 for S seconds; p50/p95 of ``finished_at - created_at``;
4. system, ``max_batch=1``: M jobs on a fresh worker.

Under each run of this project's continuous decoder (direct and system) a line says where the
device loop's time went: the share of the wall it was busy, and the count, mean time and rows of its
decode steps and joins (the worker's ``textnlp_device_loop_*`` metrics, read from its ``/metrics``).
It prints a table and one final line ``BENCH_RESULT {json}``. The system wall time is the ledger's
(from just before ``submit_many`` to the last ``finished_at``), so the client's polling interval
does not count; the client-observed time is reported beside it.
Models are built once into ``bench/.models/`` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/throughput.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

MODEL_ROOT = REPO / "bench" / ".models"
# --simulated-device: the folder a worker's PYTHONPATH gets, so its sitecustomize runs there too.
SIMULATED_DEVICE_PATH = REPO / "bench" / "simulated_device"
_spec = importlib.util.spec_from_file_location("simulated_device", SIMULATED_DEVICE_PATH / "sitecustomize.py")
assert _spec is not None and _spec.loader is not None
simulated_device = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simulated_device)
NODE = "benchnode"
MAX_WAIT_MS = 50


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- models and prompts ----------------------------------------------------------------------

def ensure_model(name: str) -> tuple[str, Path]:
    """The model's directory in ``bench/.models`` (built now if there is none); (version, path)."""
    from textnlp_jobs.inference import store
    from textnlp_jobs.inference.bootstrap import build_model

    folder = MODEL_ROOT / name
    built = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
    if built:
        path = max(built, key=lambda p: p.stat().st_mtime)
        say(f"model {name}: reusing {path.relative_to(REPO)}")
    else:
        say(f"model {name}: building into {MODEL_ROOT.relative_to(REPO)} (once)")
        started = time.perf_counter()
        path = store.build_into_store(MODEL_ROOT, name, lambda target: build_model(name, target))
        say(f"model {name}: built in {time.perf_counter() - started:.1f}s at {path.relative_to(REPO)}")
    return path.name, path


def make_prompts(count: int) -> list[str]:
    """``count`` deterministic prompts: the first 6-10 words of the stdlib's docstring paragraphs."""
    from textnlp_jobs.inference.corpus import python_docstrings

    paragraphs = python_docstrings()
    prompts = []
    for i in range(count):
        words = paragraphs[i % len(paragraphs)].split()
        prompts.append(" ".join(words[: 6 + i % 5]))
    return prompts


def torch_device(device: str) -> str:
    kind, _, index = device.replace(":", ".").partition(".")
    return f"cuda:{index or 0}" if kind == "cuda" else "cpu"


# --- the limit: the engine alone -------------------------------------------------------------

def make_limits(count: int, fixed: int, spread: tuple[int, int] | None, seed: int) -> list[int]:
    """Each job's ``max_new_tokens``: ``fixed`` (uniform), or drawn in [lo, hi] with ``seed`` (mixed)."""
    if spread is None:
        return [fixed] * count
    import random

    draw = random.Random(seed)
    return [draw.randint(spread[0], spread[1]) for _ in range(count)]


def _direct_figures(jobs: int, tokens: int, wall: float, **extra: Any) -> dict[str, Any]:
    return {"jobs": jobs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "jobs_per_s": jobs / wall, "ms_per_job": 1000 * wall / jobs, **extra}


def run_direct(engine: Any, prompt_ids: list[list[int]], batch: int, limits: list[int]) -> dict[str, Any]:
    """Static batches: ``TransformersEngine.generate`` on ``batch`` jobs at a time, in order."""
    from textnlp_jobs.inference.engine import EngineRequest, SamplingParams

    requests = [EngineRequest(ids, n, SamplingParams()) for ids, n in zip(prompt_ids, limits, strict=True)]
    engine.generate(requests[:batch])  # warm this batch shape (allocator, kernels)
    _synchronize(engine.device)
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        tokens += sum(r.tokens_generated for r in engine.generate(requests[start:start + batch]))
    _synchronize(engine.device)
    return _direct_figures(len(requests), tokens, time.perf_counter() - started, batch=batch, kind="static")


def run_direct_continuous(engine: Any, prompt_ids: list[list[int]], batch: int, limits: list[int]) -> dict[str, Any]:
    """This project's continuous decoder (``ContinuousBatcher``) fed every job at once."""
    from textnlp_jobs.inference.continuous import ContinuousBatcher
    from textnlp_jobs.inference.engine import EngineRequest, SamplingParams
    from textnlp_jobs.settings import BatchingPolicy

    requests = [EngineRequest(ids, n, SamplingParams()) for ids, n in zip(prompt_ids, limits, strict=True)]
    batcher = ContinuousBatcher({engine.model_name: engine},
                                lambda _: BatchingPolicy(max_batch=batch, max_wait_ms=MAX_WAIT_MS, mode="continuous"))
    batcher.start()
    try:
        for future in [batcher.submit(i, engine.model_name, r) for i, r in enumerate(requests[:batch])]:
            future.result()  # warm-up
        _synchronize(engine.device)
        loop_before = in_process_loop()
        started = time.perf_counter()
        futures = [batcher.submit(i, engine.model_name, r) for i, r in enumerate(requests)]
        tokens = sum(f.result().result.tokens_generated for f in futures)
        _synchronize(engine.device)
        wall = time.perf_counter() - started
        loop = loop_summary(loop_before, in_process_loop(), wall)
    finally:
        batcher.stop()
    return _direct_figures(len(requests), tokens, wall, batch=batch, kind="continuous", loop=loop)


def run_direct_hf_continuous(engine: Any, prompt_ids: list[list[int]], limits: list[int],
                             max_batch_tokens: int | None) -> dict[str, Any]:
    """transformers' own ``ContinuousBatchingManager`` (``model.init_continuous_batching``) on the
    same model object, greedy, per-request ``max_new_tokens``; ``max_batch_tokens`` sizes it."""
    from transformers import GenerationConfig

    config: dict[str, Any] = {}
    try:
        from transformers import ContinuousBatchingConfig  # type: ignore[attr-defined]

        if max_batch_tokens:
            config["continuous_batching_config"] = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens)
        generation = GenerationConfig(max_new_tokens=max(limits), do_sample=False, eos_token_id=engine.eos_id,
                                      pad_token_id=engine.pad_id)
    except ImportError:  # older transformers: the sizing lives on the generation config
        generation = GenerationConfig(max_new_tokens=max(limits), do_sample=False, eos_token_id=engine.eos_id,
                                      pad_token_id=engine.pad_id,
                                      **({"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}))
    manager = engine.model.init_continuous_batching(generation_config=generation, **config)
    manager.start()
    try:
        def run(indices: range) -> int:
            ids = {manager.add_request(prompt_ids[i], request_id=f"r{i}", max_new_tokens=limits[i]) for i in indices}
            tokens = 0
            give_up = time.monotonic() + 600
            while ids:
                result = manager.get_result(timeout=1.0)
                if result is None:
                    if not manager.is_running() or time.monotonic() > give_up:
                        raise RuntimeError(f"continuous batching manager stopped with {len(ids)} requests left")
                    continue
                if result.request_id in ids and result.is_finished():
                    ids.discard(result.request_id)
                    generated = list(result.generated_tokens)
                    tokens += len(generated) - (1 if generated and generated[-1] == engine.eos_id else 0)
            return tokens

        run(range(min(len(prompt_ids), 32)))  # warm-up
        _synchronize(engine.device)
        started = time.perf_counter()
        tokens = run(range(len(prompt_ids)))
        _synchronize(engine.device)
        wall = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    return _direct_figures(len(prompt_ids), tokens, wall, kind="hf_continuous", max_batch_tokens=max_batch_tokens)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --- where the device loop's time went ------------------------------------------------------

LOOP_FAMILIES = {"textnlp_device_loop_seconds": "seconds", "textnlp_device_loop_operations": "operations",
                 "textnlp_device_loop_rows": "rows"}


def loop_counters(families: Any) -> dict[str, dict[str, float]]:
    """phase -> {seconds, operations, rows} summed over models, from metric families (this
    process's registry, or a worker's /metrics parsed)."""
    out: dict[str, dict[str, float]] = {}
    for family in families:
        field = LOOP_FAMILIES.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                phase = out.setdefault(sample.labels["phase"], {"seconds": 0.0, "operations": 0.0, "rows": 0.0})
                phase[field] += sample.value
    return out


def loop_summary(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                 wall: float) -> dict[str, Any]:
    """What the device loop did between two readings: per phase its count, mean time and rows,
    and the share of ``wall`` it was busy."""
    phases: dict[str, Any] = {}
    for phase, end in after.items():
        start = before.get(phase, {})
        delta = {k: end[k] - start.get(k, 0.0) for k in end}
        if delta["operations"] <= 0:
            continue
        phases[phase] = {"count": int(delta["operations"]), "mean_ms": 1000 * delta["seconds"] / delta["operations"],
                         "mean_rows": delta["rows"] / delta["operations"], "seconds": delta["seconds"]}
    busy = sum(p["seconds"] for p in phases.values())
    return {"busy_share": busy / wall if wall > 0 else None, "phases": phases}


def in_process_loop() -> dict[str, dict[str, float]]:
    from textnlp_jobs.metrics.registry import REGISTRY

    return loop_counters(REGISTRY.collect())


def scraped_loop(port: int) -> dict[str, dict[str, float]]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    give_up = time.monotonic() + 30  # the worker answers pings before its /metrics may be up
    while True:
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            return loop_counters(text_string_to_metric_families(text))
        except OSError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the system ------------------------------------------------------------------------------

class Stack:
    """A scratch ledger and broker, the model registered, and helpers to run one worker on it."""

    def __init__(self, exits: ExitStack, *, name: str, model_path: Path, device: str, embedded: bool,
                 torch_threads: int | None, worker_concurrency: int | None, group_spacing_ms: float | None = None,
                 dtype: str = "auto",
                 postgres: str = "postgresql+psycopg://postgres@127.0.0.1:5432",
                 redis: str = "127.0.0.1:6379") -> None:
        from textnlp_jobs import local_stack
        from textnlp_jobs.client import Client
        from textnlp_jobs.db.migrate import upgrade
        from textnlp_jobs.db.session import dispose_engines, session_factory
        from textnlp_jobs.inference import store

        self.name = name
        self.device = device
        self.torch_threads = torch_threads
        self.worker_concurrency = worker_concurrency
        self.workdir = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="textnlp-bench-")))
        env = {
            "TEXTNLP_HOME": str(self.workdir / "home"),
            "TEXTNLP_MODEL_STORE": str(MODEL_ROOT),
            "TEXTNLP_NODE_NAME": NODE,
            "TEXTNLP_PLACEMENT": json.dumps({"*": [name]}),
        }
        if group_spacing_ms is not None:
            env["TEXTNLP_GROUP_SPACING_MS"] = str(group_spacing_ms)
        if dtype != "auto":
            env["TEXTNLP_DTYPE"] = json.dumps({"*": dtype})
        if not embedded:
            env["TEXTNLP_DATABASE_URL"] = exits.enter_context(local_stack.scratch_postgres(postgres))
            host, _, port = redis.partition(":")
            env["TEXTNLP_BROKER_URL"] = exits.enter_context(local_stack.scratch_redis(host, int(port or 6379)))
        exits.callback(dispose_engines)
        self.stack = local_stack.LocalStack(env, self.workdir)
        exits.callback(self.stack.stop_all)  # runs before the scratch database is dropped
        self.settings = self.stack.settings()
        upgrade(self.settings.database_url_value())
        with session_factory(self.settings).begin() as session:
            store.register_version(session, name, model_path)
        self.client = Client(self.settings)
        exits.callback(self.client.celery.close)

    def start_worker(self, max_batch: int, mode: str | None = None) -> Any:
        from workers.device import worker_hostname

        policy: dict[str, Any] = {"max_batch": max_batch, "max_wait_ms": MAX_WAIT_MS}
        if mode:
            policy["mode"] = mode
        batching = json.dumps({"*": policy})
        args = ["--models", self.name]
        if self.torch_threads:
            args += ["--torch-threads", str(self.torch_threads)]
        if self.worker_concurrency and max_batch > 1:  # the batch-1 run keeps the default (one thread)
            args += ["--concurrency", str(self.worker_concurrency)]
        # The worker serves /metrics so each run can say where its device loop's time went.
        self.metrics_port = free_port()
        worker = self.stack.device_worker(self.device, extra_env={"TEXTNLP_BATCHING": batching,
                                                                  "TEXTNLP_METRICS_PORT": str(self.metrics_port)},
                                          args=args)
        started = time.perf_counter()
        worker.start()
        try:
            self.stack.wait_ready(worker_hostname(self.settings, self.device), timeout=300)
        except BaseException:
            worker.stop()
            raise
        say(f"worker {self.device} max_batch={max_batch} mode={mode or 'default'} "
            f"ready in {time.perf_counter() - started:.1f}s "
            f"(pid {worker.process.pid if worker.process else None}, log {worker.log_path})")
        return worker

    def spec(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        return {"prompt": prompt, "model": self.name, "max_new_tokens": max_new_tokens, "max_attempts": 1}

    def run_all(self, prompts: list[str], limits: list[int], timeout: float) -> dict[str, Any]:
        """Submit every prompt at once (job i with ``limits[i]`` new tokens), wait for all; figures
        from the ledger."""
        loop_before = scraped_loop(self.metrics_port)
        t_submit = datetime.now(UTC)
        started = time.perf_counter()
        jobs = self.client.submit_many([self.spec(p, n) for p, n in zip(prompts, limits, strict=True)])
        submitted = time.perf_counter() - started
        done = self.client.wait([j.id for j in jobs], timeout=timeout, poll=0.02)
        client_wall = time.perf_counter() - started
        result = summarize(done, t_submit)
        # The engine process sends its metrics with its results, at most every 50 ms, and once more
        # 50 ms after the last ones: wait that long (and the worker's relay) so its last steps count.
        time.sleep(0.25)
        result.update(submit_s=submitted, client_wall_s=client_wall,
                      loop=loop_summary(loop_before, scraped_loop(self.metrics_port), result["wall_s"]))
        return result

    def run_steady(self, prompts: list[str], max_new_tokens: int, rate: float, seconds: float,
                   threads: int, timeout: float) -> dict[str, Any]:
        """Submit jobs one at a time, the k-th at t0 + k/rate, for ``seconds``; latency percentiles."""
        count = max(1, int(rate * seconds))
        ids: list[Any] = [None] * count
        late: list[float] = [0.0] * count
        next_index = [0]
        lock = threading.Lock()
        errors: list[BaseException] = []
        t0 = time.perf_counter() + 0.1

        def submitter() -> None:
            while True:
                with lock:
                    k = next_index[0]
                    if k >= count or errors:
                        return
                    next_index[0] += 1
                due = t0 + k / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                late[k] = max(0.0, time.perf_counter() - due)
                try:
                    ids[k] = self.client.submit(prompts[k % len(prompts)], model=self.name,
                                                max_new_tokens=max_new_tokens, max_attempts=1).id
                except BaseException as error:  # surfaced below, after the threads stop
                    errors.append(error)
                    return

        pool = [threading.Thread(target=submitter, name=f"submit-{i}", daemon=True) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        if errors:
            raise errors[0]
        offered_for = time.perf_counter() - t0
        done = self.client.wait(ids, timeout=timeout, poll=0.02)
        result = summarize(done, None)
        latencies = sorted((j.finished_at - j.created_at).total_seconds() for j in done if j.finished_at)
        result.update(
            target_rate_jobs_per_s=rate, offered_jobs=count, offered_seconds=offered_for,
            achieved_rate_jobs_per_s=count / offered_for if offered_for > 0 else None,
            submit_late_p95_ms=1000 * percentile(sorted(late), 95), submit_threads=threads,
            latency_p50_ms=1000 * percentile(latencies, 50), latency_p95_ms=1000 * percentile(latencies, 95),
            latency_max_ms=1000 * latencies[-1] if latencies else None,
        )
        return result


def summarize(jobs: list[Any], t_submit: datetime | None) -> dict[str, Any]:
    succeeded = [j for j in jobs if j.status == "succeeded"]
    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status] = statuses.get(job.status, 0) + 1
    errors = sorted({f"{j.error_code}: {j.error_message}" for j in jobs if j.status != "succeeded"})
    tokens = sum(j.tokens_generated or 0 for j in succeeded)
    finished = [j.finished_at for j in jobs if j.finished_at is not None]
    first = t_submit or min(j.created_at for j in jobs)
    wall = (max(finished) - first).total_seconds() if finished else float("nan")
    batch_sizes = [j.batch_size for j in succeeded if j.batch_size]
    started = sorted(j.started_at for j in jobs if j.started_at is not None)
    inference = [j.inference_seconds for j in succeeded if j.inference_seconds is not None]
    return {
        "jobs": len(jobs), "statuses": statuses, "errors": errors[:5], "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None, "jobs_per_s": len(jobs) / wall if wall > 0 else None,
        "ms_per_job": 1000 * wall / len(jobs),
        "mean_batch_size": statistics.fmean(batch_sizes) if batch_sizes else None,
        "mean_inference_s": statistics.fmean(inference) if inference else None,
        # When the device got its first and its last job: idle before the first is start-up, not
        # throughput (the ledger's clock, as the wall).
        "first_started_s": (started[0] - first).total_seconds() if started else None,
        "last_started_s": (started[-1] - first).total_seconds() if started else None,
    }


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; ``ordered`` is sorted."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- the machine -----------------------------------------------------------------------------

def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "cpu": _cpu_name(), "device": device,
    }
    if device.startswith("cuda"):
        index = int(torch_device(device).split(":")[1])
        props = torch.cuda.get_device_properties(index)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, visible_gpus=torch.cuda.device_count())
    else:
        info["device_name"] = info["cpu"]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_memory_by_pid() -> dict[int, float]:
    """MiB of GPU memory per process, from nvidia-smi (empty where there is none)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage: dict[int, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                usage[int(parts[0])] = float(parts[1])
            except ValueError:
                continue
    return usage


# --- one model, end to end -------------------------------------------------------------------

def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from textnlp_jobs.heap import freeze_start_up_heap
    from textnlp_jobs.inference.engine import TransformersEngine

    version, path = ensure_model(name)
    prompts = make_prompts(args.jobs)
    unbatched = prompts[: args.unbatched_jobs]
    workloads = {"uniform": make_limits(args.jobs, args.max_new_tokens, None, args.seed)}
    if args.max_new_tokens_range:
        workloads["mixed"] = make_limits(args.jobs, args.max_new_tokens, args.max_new_tokens_range, args.seed)
    result: dict[str, Any] = {"model": name, "version": version, "jobs": args.jobs, "batch": args.batch,
                              "batches": args.batches, "unbatched_jobs": len(unbatched),
                              "max_new_tokens": args.max_new_tokens, "mode": args.mode,
                              "max_new_tokens_range": args.max_new_tokens_range, "seed": args.seed,
                              "workloads": {}}
    from textnlp_jobs.settings import BatchingPolicy

    result["worker_kind"] = BatchingPolicy(mode=args.mode).mode_on(torch_device(args.device))

    # 1. The limit: the engine in this process, no ledger, no broker; every direct kind, per workload.
    dev = torch_device(args.device)
    engine = TransformersEngine(name, version, path, dev, args.dtype)
    result["dtype"] = engine.dtype
    engine.warm_up()
    ids = [engine.tokenize(p) for p in prompts]
    # The direct runs are the best the engine does: as in the worker's processes (heap.py), a full
    # collection must not walk the start-up heap (about 200 ms on two cores) in the middle of one.
    # Unfrozen after them, so this process is an ordinary producer in the system runs.
    freeze_start_up_heap("bench")
    for workload, limits in workloads.items():
        runs: list[dict[str, Any]] = []
        for batch in args.batches:
            say(f"{name}/{workload}: direct static, {len(ids)} prompts in batches of {batch} on {dev}")
            runs.append(_attempt(partial(run_direct, engine, ids, batch, limits), "static", batch))
        say(f"{name}/{workload}: direct continuous (this project's decoder), max_batch={args.batch}")
        runs.append(_attempt(partial(run_direct_continuous, engine, ids, args.batch, limits), "continuous",
                             args.batch))
        for tokens in args.hf_max_batch_tokens:
            say(f"{name}/{workload}: direct transformers ContinuousBatchingManager, "
                f"max_batch_tokens={tokens or 'default'}")
            runs.append(_attempt(partial(run_direct_hf_continuous, engine, ids, limits, tokens or None),
                                 "hf_continuous", None))
        for run in runs:
            say(f"  {_label(run):<28} {_fmt(run.get('tokens_per_s'))} tok/s {run.get('error', '')}")
        result["workloads"][workload] = {"direct": runs, "tokens_requested": sum(limits)}
    result["direct_unbatched"] = None
    if unbatched:
        say(f"{name}: direct, {len(unbatched)} prompts at batch 1")
        result["direct_unbatched"] = run_direct(engine, ids[: len(unbatched)], 1,
                                                workloads["uniform"][: len(unbatched)])
    if dev.startswith("cuda"):
        result["direct_peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    # The worker gets the device to itself: nothing of the direct run stays busy or resident.
    del engine
    gc.unfreeze()
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    with ExitStack() as exits:
        stack = Stack(exits, name=name, model_path=path, device=args.device, embedded=args.embedded,
                      torch_threads=args.torch_threads, worker_concurrency=args.worker_concurrency,
                      group_spacing_ms=args.group_spacing_ms, dtype=args.dtype, postgres=args.postgres,
                      redis=args.redis)
        mode = "embedded (SQLite + filesystem broker)" if args.embedded else "PostgreSQL + Redis"
        result["stack"] = mode
        say(f"{name}: scratch stack {mode}, workdir {stack.workdir}")

        # 2. The system, one worker at max_batch=B, every workload on it.
        worker = stack.start_worker(args.batch, args.mode)
        try:
            for workload, limits in workloads.items():
                direct_wall = max((r.get("wall_s") or 0) for r in result["workloads"][workload]["direct"])
                timeout = 300 + 30 * direct_wall
                say(f"{name}/{workload}: system, {len(prompts)} jobs, max_batch={args.batch}")
                system = stack.run_all(prompts, limits, timeout)
                result["workloads"][workload]["system"] = system
                say(f"{name}/{workload}: system {_fmt(system['tokens_per_s'])} tok/s, "
                    f"mean batch {_fmt(system['mean_batch_size'])}")
            memory = gpu_memory_by_pid()
            if memory and worker.process is not None:
                result["worker_gpu_memory_mib"] = memory.get(worker.process.pid)

            # 3. Latency at a steady offered load under capacity, on the same worker.
            capacity = result["workloads"]["uniform"]["system"]["jobs_per_s"]
            if args.latency_seconds > 0 and capacity:
                rate = args.load_fraction * capacity
                say(f"{name}: latency, {rate:.1f} jobs/s ({args.load_fraction:.0%} of {capacity:.1f}) "
                    f"for {args.latency_seconds:.0f}s")
                result["latency"] = stack.run_steady(prompts, args.max_new_tokens, rate, args.latency_seconds,
                                                     args.submit_threads, 300)
                say(f"{name}: latency p50 {_fmt(result['latency']['latency_p50_ms'])} ms, "
                    f"p95 {_fmt(result['latency']['latency_p95_ms'])} ms")
        except BaseException:
            say(f"worker log tail:\n{worker.log_tail()}")
            raise
        finally:
            worker.stop()

        # 4. The system at max_batch=1.
        if unbatched:
            worker = stack.start_worker(1, args.mode)
            try:
                say(f"{name}: system, {len(unbatched)} jobs, max_batch=1")
                result["system_unbatched"] = stack.run_all(unbatched, workloads["uniform"][: len(unbatched)],
                                                           300 + 30 * result["direct_unbatched"]["wall_s"])
                say(f"{name}: system batch-1 {_fmt(result['system_unbatched']['tokens_per_s'])} tok/s")
            except BaseException:
                say(f"worker log tail:\n{worker.log_tail()}")
                raise
            finally:
                worker.stop()

    derive(result)
    return result


def _attempt(run: Any, kind: str, batch: int | None) -> dict[str, Any]:
    """One direct run; a kind that fails here (out of memory, an API this transformers lacks) is
    recorded with its error instead of ending the benchmark."""
    try:
        return dict(run())
    except Exception as error:
        say(f"  {kind} batch={batch}: failed: {type(error).__name__}: {str(error)[:300]}")
        return {"kind": kind, "batch": batch, "error": f"{type(error).__name__}: {str(error)[:300]}",
                "tokens_per_s": None}


def _label(run: dict[str, Any]) -> str:
    if run["kind"] == "hf_continuous":
        return f"hf-continuous t={run.get('max_batch_tokens') or 'default'}"
    return f"{run['kind']} B={run['batch']}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derive(r: dict[str, Any]) -> None:
    """Per workload: the best direct run, system ÷ best direct, and the system's work per job
    beyond the engine's (system ms/job − ms/job of the direct run of the worker's own kind)."""
    for figures in r["workloads"].values():
        ok = [run for run in figures["direct"] if run.get("tokens_per_s")]
        if not ok:
            continue
        best = max(ok, key=lambda run: run["tokens_per_s"])
        figures["best_direct"] = {"label": _label(best), "tokens_per_s": best["tokens_per_s"]}
        system = figures.get("system")
        if not system:
            continue
        figures["system_vs_best_direct"] = _ratio(system["tokens_per_s"], best["tokens_per_s"])
        same = [run for run in ok if run["kind"] == r["worker_kind"] and run["batch"] == r["batch"]]
        if same:
            figures["system_vs_same_direct"] = _ratio(system["tokens_per_s"], same[0]["tokens_per_s"])
            figures["overhead_ms_per_job"] = system["ms_per_job"] - same[0]["ms_per_job"]
        static = [run for run in ok if run["kind"] == "static" and run["batch"] == r["batch"]]
        if static:
            figures["system_vs_static_direct"] = _ratio(system["tokens_per_s"], static[0]["tokens_per_s"])
    du, su = r.get("direct_unbatched"), r.get("system_unbatched")
    if su and du:
        r["system_vs_direct_unbatched"] = _ratio(su["tokens_per_s"], du["tokens_per_s"])
        r["overhead_ms_per_job_unbatched"] = su["ms_per_job"] - du["ms_per_job"]


# --- output ----------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def loop_line(loop: dict[str, Any]) -> str:
    """e.g. ``device loop: busy 93% | step 279 x 23.8 ms, 123.9 rows | join 8 x 199.7 ms, 16.0 rows``"""
    parts = [f"{phase} {p['count']} x {p['mean_ms']:.1f} ms, {p['mean_rows']:.1f} rows"
             for phase, p in sorted(loop["phases"].items())]
    busy = loop.get("busy_share")
    return f"device loop: busy {busy:.0%} | " + " | ".join(parts) if busy is not None else " | ".join(parts)


def print_table(info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print()
    print(f"machine: {info['host']}  device {info['device']} = {info['device_name']}  "
          f"torch {info['torch']}  transformers {info['transformers']}  torch threads {info['torch_threads']}  "
          f"cpus {info['cpu_count']}  python {info['python']}")
    if info.get("simulated_device"):
        print(f"SIMULATED device (--simulated-device {info['simulated_device']}): no model work, "
              "every decode step and prefill only spins (HOST_MS, holding the GIL) and sleeps; direct = this project's "
              "decoder on the same device times")
    header = f"{'run':<30}{'jobs':>6}{'tokens':>8}{'wall s':>9}{'tok/s':>11}{'jobs/s':>9}{'ms/job':>9}{'batch':>7}"
    for r in results:
        print(f"\nmodel {r['model']} ({r['version']})  N={r['jobs']} worker max_batch={r['batch']} "
              f"mode={r['worker_kind']}  dtype={r.get('dtype', '?')}  stack: {r.get('stack', '-')}")
        for workload, figures in r["workloads"].items():
            low_high = r["max_new_tokens_range"] or (0, 0)
            spread = (f"max_new_tokens {low_high[0]}:{low_high[1]} seed {r['seed']}"
                      if workload == "mixed" else f"max_new_tokens {r['max_new_tokens']}")
            print(f"\n  workload {workload} ({spread}, {figures['tokens_requested']} tokens asked)")
            print("  " + header)
            print("  " + "-" * len(header))
            rows = [(f"direct {_label(run)}", run) for run in figures["direct"]]
            rows.append(("system", figures.get("system")))
            for label, row in rows:
                if not row:
                    continue
                if row.get("error"):
                    print(f"  {label:<30}failed: {row['error'][:80]}")
                    continue
                batch = row.get("mean_batch_size", row.get("batch"))
                print(f"  {label:<30}{row['jobs']:>6}{row['tokens']:>8}{_fmt(row['wall_s'], 2):>9}"
                      f"{_fmt(row['tokens_per_s']):>11}{_fmt(row['jobs_per_s']):>9}{_fmt(row['ms_per_job'], 2):>9}"
                      f"{_fmt(batch):>7}")
                if row.get("statuses") and set(row["statuses"]) != {"succeeded"}:
                    print(f"  {'':<30}statuses {row['statuses']}  {row['errors']}")
                if row.get("loop"):
                    print(f"  {'':<4}{loop_line(row['loop'])}")
                if row.get("first_started_s") is not None and row.get("submit_s") is not None:
                    print(f"  {'':<4}timeline: submit_many returned at {row['submit_s']:.3f} s, first job started at "
                          f"{row['first_started_s']:.3f} s, last at {row['last_started_s']:.3f} s")
            best = figures.get("best_direct") or {}
            print(f"  best direct: {best.get('label', '-')} {_fmt(best.get('tokens_per_s'))} tok/s")
            print(f"  system / best direct ({workload}):        {_fmt(figures.get('system_vs_best_direct'), 3)}")
            print(f"  system / direct of its own kind+batch:   {_fmt(figures.get('system_vs_same_direct'), 3)}")
            static = _fmt(figures.get("system_vs_static_direct"), 3)
            print(f"  system / direct static B={r['batch']}:            {static}")
            print(f"  system overhead per job ({workload}):      {_fmt(figures.get('overhead_ms_per_job'), 2)} ms")
        if r.get("system_unbatched"):
            print(f"\n  batch 1: system / direct {_fmt(r.get('system_vs_direct_unbatched'), 3)}, "
                  f"overhead {_fmt(r.get('overhead_ms_per_job_unbatched'), 2)} ms/job")
        lat = r.get("latency")
        if lat:
            print(f"  latency at {_fmt(lat['achieved_rate_jobs_per_s'])} jobs/s offered "
                  f"(target {_fmt(lat['target_rate_jobs_per_s'])}, {lat['offered_jobs']} jobs): "
                  f"p50 {_fmt(lat['latency_p50_ms'])} ms  p95 {_fmt(lat['latency_p95_ms'])} ms  "
                  f"max {_fmt(lat['latency_max_ms'])} ms  mean batch {_fmt(lat['mean_batch_size'])}")
        if r.get("worker_gpu_memory_mib") is not None:
            print(f"  worker GPU memory (nvidia-smi): {_fmt(r['worker_gpu_memory_mib'], 0)} MiB")
    print()
    for r in results:
        for workload, figures in r["workloads"].items():
            ratio = _fmt(figures.get("system_vs_best_direct"), 3)
            print(f"RATIO {r['model']} {workload} N={r['jobs']}: system / best direct = {ratio}"
                  f" (best: {(figures.get('best_direct') or {}).get('label', '-')}); overhead "
                  f"{_fmt(figures.get('overhead_ms_per_job'), 2)} ms/job")


def main(argv: list[str] | None = None) -> int:
    from textnlp_jobs.settings import ModelDtype

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, small, narrow, launch or tiny; comma-separated")
    parser.add_argument("--jobs", type=int, default=256, help="N: jobs for the batched runs")
    parser.add_argument("--batch", type=int, default=None,
                        help="B: the worker's max_batch (default: the largest of --batches)")
    parser.add_argument("--batches", default="16", help="static direct batch sizes, comma-separated (e.g. 32,64,128)")
    parser.add_argument("--mode", choices=["continuous", "static"], default=None,
                        help="the worker's batching mode (default: the device's default)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens-range", default=None,
                        help="LO:HI adds the mixed workload: each job's max_new_tokens drawn in [LO, HI]")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the mixed workload's draws")
    parser.add_argument("--hf-max-batch-tokens", default="0",
                        help="sizings of the transformers ContinuousBatchingManager baseline, comma-separated "
                             "max_batch_tokens (0 = its default; empty skips it)")
    parser.add_argument("--device", default="cpu.0", help="cpu.0 or cuda.N")
    parser.add_argument("--embedded", action="store_true", help="SQLite + filesystem broker; no servers")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432",
                        help="PostgreSQL server for the scratch database")
    parser.add_argument("--redis", default="127.0.0.1:6379", help="Redis server (host:port) for the scratch db number")
    parser.add_argument("--unbatched-jobs", type=int, default=None, help="M: jobs at max_batch=1 (default 0: skipped)")
    parser.add_argument("--latency-seconds", type=float, default=15.0, help="steady-load run; 0 skips it")
    parser.add_argument("--load-fraction", type=float, default=0.5, help="offered load / batched capacity")
    parser.add_argument("--submit-threads", type=int, default=4, help="producer threads of the steady load")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads in this process AND the worker (default: torch's own default)")
    parser.add_argument("--worker-concurrency", type=int, default=None,
                        help="task threads of the batched worker (default: the worker's own, = max_batch)")
    parser.add_argument("--dtype", choices=typing.get_args(ModelDtype), default="auto",
                        help="weights' dtype, direct and the worker's TEXTNLP_DTYPE (auto: the checkpoint's)")
    parser.add_argument("--group-spacing-ms", type=float, default=None,
                        help="the worker's TEXTNLP_GROUP_SPACING_MS (default: the device's, 25 on a CPU, 0 on a GPU)")
    parser.add_argument("--simulated-device", default=None, metavar="STEP_MS[,PREFILL_MS[,HOST_MS]]",
                        help="no model work: each decode step takes STEP_MS, each start or join PREFILL_MS, "
                             "the first HOST_MS of each spent in Python holding the GIL as a launch-bound "
                             "model's kernel launches do, the rest asleep (bench/simulated_device), here and "
                             "in the worker; only this project's decoder runs direct. The system's own costs "
                             "at a GPU's time scale, on a CPU machine")
    args = parser.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    if args.simulated_device:
        try:
            simulated_device.parse(args.simulated_device)
        except ValueError as error:
            parser.error(f"--simulated-device: {error}")
        if args.batch is None:
            parser.error("--simulated-device needs --batch (there are no static direct runs to take it from)")
        # Static generate() and transformers' manager would run the real model: not comparable.
        args.batches, args.hf_max_batch_tokens = [], ""
    if args.batch is None:
        args.batch = max(args.batches)
    args.hf_max_batch_tokens = [int(t) for t in args.hf_max_batch_tokens.split(",") if t.strip()]
    if args.max_new_tokens_range:
        low, _, high = args.max_new_tokens_range.partition(":")
        args.max_new_tokens_range = (int(low), int(high or low))
    if args.unbatched_jobs is None:
        args.unbatched_jobs = 0
    args.unbatched_jobs = max(0, min(args.unbatched_jobs, args.jobs))
    if args.jobs < 1 or args.batch < 1:
        parser.error("--jobs and --batch must be at least 1")

    # `timeout` and friends send SIGTERM: unwind, so the worker subprocess and scratch stack go too.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    # Settings come from the scratch stack alone: drop any TEXTNLP_* this shell carries.
    stray = sorted(k for k in os.environ if k.startswith("TEXTNLP_"))
    if stray:
        say(f"ignoring {', '.join(stray)} from the environment")
        for key in stray:
            del os.environ[key]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.simulated_device:
        # Here now, and in the worker and its engine process through their start-up (sitecustomize).
        os.environ[simulated_device.ENVIRONMENT] = args.simulated_device
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SIMULATED_DEVICE_PATH),
                                                                 os.environ.get("PYTHONPATH")]))
        simulated_device.install(args.simulated_device)
        say(f"simulated device: {args.simulated_device} ms (step[,prefill[,host]]), no model work")
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"{args.device} asked for but torch sees no CUDA device")

    info = machine(args.device)
    info["simulated_device"] = args.simulated_device
    say(f"{info['device_name']}, torch {info['torch']}, {info['torch_threads']} torch threads")
    results = [bench_model(name.strip(), args) for name in args.model.split(",") if name.strip()]
    print_table(info, results)
    print("BENCH_RESULT " + json.dumps({"machine": info, "args": vars(args), "results": results},
                                       default=str, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
