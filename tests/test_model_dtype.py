"""``TEXTNLP_DTYPE``: the dtype a model's float weights are loaded in on the device, per model.

"auto" (the default) keeps the dtype the checkpoint's config.json records; a model named there
loads in the one given, in static and continuous batches alike, and a worker says which in its
``model_loaded`` line. A value that is not a dtype is refused naming the setting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.inference import registry
from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.inference.loading import emulated_on_this_cpu
from textnlp_jobs.local_stack import REPO_ROOT, LocalStack
from textnlp_jobs.settings import BatchingPolicy, Settings
from workers.device import worker_hostname

from .helpers import PROMPTS


def weight_dtypes(engine: TransformersEngine) -> set[str]:
    return {str(parameter.dtype) for parameter in engine.model.parameters()}


def test_auto_keeps_the_checkpoints_dtype_and_a_named_one_is_loaded(tiny_model: Path, tmp_path: Path) -> None:
    as_saved = TransformersEngine("tiny", "v", tiny_model)
    assert as_saved.dtype == "float32" and weight_dtypes(as_saved) == {"torch.float32"}

    halved = TransformersEngine("tiny", "v", tiny_model, dtype="bfloat16")
    assert halved.dtype == "bfloat16" and weight_dtypes(halved) == {"torch.bfloat16"}

    # A checkpoint saved in bfloat16 loads in bfloat16 with "auto", and in float32 when asked.
    saved_bf16 = tmp_path / "bf16"
    halved.model.save_pretrained(saved_bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, saved_bf16 / name)
    assert json.loads((saved_bf16 / "config.json").read_text()).get("dtype") == "bfloat16"
    assert TransformersEngine("tiny", "v", saved_bf16).dtype == "bfloat16"
    assert TransformersEngine("tiny", "v", saved_bf16, dtype="float32").dtype == "float32"


def test_a_model_in_bfloat16_decodes_in_static_and_continuous_batches(tiny_model: Path) -> None:
    engine = TransformersEngine("tiny", "v", tiny_model, dtype="bfloat16")
    requests = [EngineRequest(engine.tokenize(p), 12, SamplingParams(temperature=0.8) if i % 2 else SamplingParams(),
                              seed=i) for i, p in enumerate(PROMPTS[:6])]
    static = engine.generate(requests)
    batcher = ContinuousBatcher({"m": engine}, lambda _: BatchingPolicy(max_batch=4, max_wait_ms=1,
                                                                        mode="continuous"))
    batcher.start()
    try:
        continuous = [batcher.submit(i, "m", r).result(timeout=120).result for i, r in enumerate(requests)]
    finally:
        batcher.stop()
    for results in (static, continuous):
        for result in results:
            assert result.text and 1 <= len(result.token_ids) <= 12
            assert len(result.logprobs) == len(result.token_ids) and all(lp <= 0 for lp in result.logprobs)


def test_settings_take_a_dtype_per_model_with_a_default() -> None:
    settings = Settings(home="/tmp/unused", dtype={"small": "bfloat16", "*": "float16"})
    assert (settings.dtype_for("small"), settings.dtype_for("demo")) == ("bfloat16", "float16")
    assert Settings(home="/tmp/unused").dtype_for("small") == "auto"


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16\n"


def test_a_dtype_is_emulated_on_a_cpu_whose_flags_lack_its_instructions() -> None:
    assert emulated_on_this_cpu("bfloat16", AVX2_ONLY) and emulated_on_this_cpu("float16", WITH_BF16)
    assert not emulated_on_this_cpu("bfloat16", WITH_BF16)
    assert not emulated_on_this_cpu("float32", AVX2_ONLY) and not emulated_on_this_cpu("auto", AVX2_ONLY)
    assert not emulated_on_this_cpu("bfloat16", ARM)  # no x86 flags line: cannot tell, so no warning


def test_a_value_that_is_not_a_dtype_is_refused_naming_the_setting(tmp_path: Path) -> None:
    env = {"TEXTNLP_HOME": str(tmp_path), "TEXTNLP_DTYPE": '{"small": "bf16"}', "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", "check"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error config.invalid: TEXTNLP_DTYPE") and "bfloat16" in line


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_serves_a_model_in_the_dtype_the_setting_names(stack: LocalStack) -> None:
    settings = stack.settings()
    with session_factory(settings)() as session:
        path = Path(registry.resolve(session, "demo").path)
    prompt = "Return a new list"
    demo = TransformersEngine("demo", "v", path, dtype="bfloat16")
    alone = demo.generate([EngineRequest(demo.tokenize(prompt), 8, SamplingParams())])[0]
    worker = stack.device_worker("cpu.0", extra_env={"TEXTNLP_DTYPE": '{"demo": "bfloat16"}'}).start()
    client = Client(settings)
    job = client.submit(prompt, model="demo", max_new_tokens=8)
    stack.wait_ready(worker_hostname(settings, "cpu.0"))
    done = client.wait(job.id, timeout=240)
    assert done.status == "succeeded", worker.log_tail()
    assert (done.text, done.tokens_generated) == (alone.text, len(alone.token_ids))
    log = worker.log_tail(400)
    assert "model_loaded model=demo" in log and "dtype=bfloat16" in log
    assert ("dtype_emulated model=demo dtype=bfloat16" in log) == emulated_on_this_cpu("bfloat16")
