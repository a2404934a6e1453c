"""Every family a user may bring either decodes row by row in the continuous batcher with the
greedy text of each job alone, or is known to be static-only and runs in static batches (with the
same text): no family's jobs fail in the decoder.

Each model is a tiny random one of that family (2 layers, 64 wide), built from its config with
the tiny test model's tokenizer; 12 jobs of different prompt and output lengths go through a
batch of at most 8 rows, so rows leave and newcomers join a running batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from textnlp_jobs.inference.continuous import ContinuousBatcher
from textnlp_jobs.inference.engine import EngineRequest, SamplingParams, TransformersEngine
from textnlp_jobs.settings import BatchingPolicy

from .helpers import PROMPTS

GPT2_SHAPE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
# Beyond the common shape below, what each family's config needs (or calls differently).
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": GPT2_SHAPE, "gptj": {**GPT2_SHAPE, "rotary_dim": 8}, "codegen": {**GPT2_SHAPE, "rotary_dim": 8},
    "gpt_bigcode": {**GPT2_SHAPE, "multi_query": True}, "bloom": {"n_layer": 2, "n_head": 4},
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16}, "phi": {}, "phi3": {}, "olmo": {}, "olmo2": {}, "stablelm": {}, "granite": {},
    "cohere": {}, "persimmon": {}, "biogpt": {}, "starcoder2": {"sliding_window": None},
    "gpt_neox": {}, "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
    "gpt_neo": {"num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 16},
    "xglm": {"d_model": 64, "ffn_dim": 128, "num_layers": 2, "attention_heads": 4},
    "mpt": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
    # Static-only: their caches cannot be merged and trimmed row by row.
    "mistral+sliding": {"sliding_window": 16}, "gemma2": {"head_dim": 16, "sliding_window": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16},
    "recurrent_gemma": {"head_dim": 16, "lru_width": 64, "attention_window_size": 16,
                        "block_types": ["recurrent", "attention"]},
    "mamba": {"state_size": 8}, "falcon_mamba": {"state_size": 8},
    "jamba": {"num_experts": 1, "attn_layer_period": 2, "attn_layer_offset": 1},
}
# Why each is static-only. A state-space model says so one way or the other by transformers'
# release: older ones mark its class stateful (5.12), newer ones build cache layers that hold a
# state (5.25).
STATE_SPACE = {"stateful_model", "cache_layers_LinearAttentionLayer"}
STATIC_ONLY = {"mistral+sliding": {"sliding_window"}, "gemma2": {"sliding_window"}, "gemma3_text": {"sliding_window"},
               "recurrent_gemma": {"sliding_window"}, "mamba": STATE_SPACE, "falcon_mamba": STATE_SPACE,
               "jamba": STATE_SPACE}


def build(family: str, tokenizer_source: Path, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    eos = tokenizer.eos_token_id
    common = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "initializer_range": 0.2,  # peaked logits: greedy choices are not near-ties
              "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    torch.manual_seed(7)
    config = AutoConfig.for_model(family.partition("+")[0], **{**common, **FAMILIES[family]})
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_decodes_row_by_row_with_the_text_of_each_job_alone_or_is_known_static_only(
        family: str, tiny_model: Path, tmp_path: Path) -> None:
    engine = TransformersEngine(family, "v", build(family, tiny_model, tmp_path / family))
    prompts = [PROMPTS[i % len(PROMPTS)] + " and then" * (i % 4) for i in range(12)]  # 4 to 11 words
    requests = [EngineRequest(engine.tokenize(prompt), 4 + (i * 7) % 20, SamplingParams())
                for i, prompt in enumerate(prompts)]
    alone = [engine.generate([request])[0].token_ids for request in requests]
    assert [r.token_ids for r in engine.generate(requests)] == alone  # static batches, for every family
    assert engine.static_only_reason in STATIC_ONLY.get(family, {None})
    if engine.static_only_reason is not None:
        return
    batcher = ContinuousBatcher({family: engine}, lambda _: BatchingPolicy(max_batch=8, max_wait_ms=1,
                                                                           mode="continuous"))
    batcher.start()
    try:
        futures = [batcher.submit(i, family, request) for i, request in enumerate(requests)]
        results = [future.result(timeout=120) for future in futures]
    finally:
        batcher.stop()
    assert [r.result.token_ids for r in results] == alone
    assert max(r.batch_size for r in results) == 8  # rows rode together, and newcomers joined them


def test_one_static_only_model_holds_its_device_to_static_batches(tiny_model: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from textnlp_jobs.inference.engine_side import batching_mode
    from textnlp_jobs.settings import Settings

    llama = TransformersEngine("l", "v", build("llama", tiny_model, tmp_path / "llama"))
    mamba = TransformersEngine("m", "v", build("mamba", tiny_model, tmp_path / "mamba"))
    continuous = Settings(batching={"*": BatchingPolicy(mode="continuous")})
    assert batching_mode(continuous, {"l": llama}) == "continuous"
    with caplog.at_level("WARNING"):  # one loop serves a device
        assert batching_mode(continuous, {"l": llama, "m": mamba}) == "static"
    assert f"reason=static_only_models m={mamba.static_only_reason}" in caplog.text
