"""Tiny random models of the families people run, built locally with the project's own tokenizer:
Llama-style (rotary, grouped-query attention, no ``n_positions``), Qwen2-style, a GPT-2 whose
tokenizer has no pad token, one with a chat template, and a Mamba, whose cache the continuous
decoder cannot merge (state-space: a recurrent state, no keys and values)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _save(model: object, tokenizer_source: Path, target: Path) -> Path:
    from transformers import AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)  # type: ignore[attr-defined]
    AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True).save_pretrained(target)
    return target


def build_family(family: str, tokenizer_source: Path, target: Path, *, seed: int = 7) -> Path:
    """``llama`` or ``qwen2``: 2 layers, 64 wide, 4 query heads sharing 2 key/value heads; ``mamba``:
    2 state-space layers, 64 wide."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    torch.manual_seed(seed)
    shape = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             # Wide initial weights make the logits peaked, so greedy choices are not near-ties.
             "initializer_range": 0.2, "bos_token_id": tokenizer.eos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "tie_word_embeddings": False}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    elif family == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        model = MambaForCausalLM(MambaConfig(
            vocab_size=len(tokenizer), hidden_size=64, state_size=8, num_hidden_layers=2, initializer_range=0.2,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    else:
        raise ValueError(family)
    model.eval()
    return _save(model, tokenizer_source, target)


def without_pad_token(source: Path, target: Path) -> Path:
    """A copy of a model whose tokenizer and config name no pad token."""
    shutil.copytree(source, target)
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name in ("config.json", "generation_config.json"):
        if (target / name).is_file():
            config = json.loads((target / name).read_text())
            config.pop("pad_token_id", None)
            (target / name).write_text(json.dumps(config))
    special = target / "special_tokens_map.json"
    if special.is_file():
        tokens = json.loads(special.read_text())
        tokens.pop("pad_token", None)
        special.write_text(json.dumps(tokens))
    return target


def with_chat_template(source: Path, target: Path) -> Path:
    """A copy of a model whose tokenizer carries a chat template."""
    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(target)
    return target


BOS, END_OF_TURN = "<s>", "<|end_of_turn|>"
INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "<|end_of_turn|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def instruct_llama(tokenizer_source: Path, target: Path) -> Path:
    """A Llama-style model dressed as the instruct models people bring: its tokenizer begins every
    sequence with a BOS token (as Llama's and Gemma's do), its chat template writes that BOS itself
    and ends each turn with a token of its own."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(tokenizer_source / "tokenizer.json"))
    backend.add_special_tokens([BOS, END_OF_TURN])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    base = json.loads((tokenizer_source / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=base["eos_token"],
                                        pad_token=base["eos_token"])
    tokenizer.chat_template = INSTRUCT_TEMPLATE
    tokenizer_dir = target.parent / f"{target.name}-tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    return build_family("llama", tokenizer_dir, target)
