"""Build the project's own models locally, since none can be downloaded.

``demo``: a tokenizer trained on Python's docstrings and a 2-layer GPT-2 trained on them for a few
hundred steps, so its output looks like text. ``small``: the same tokenizer and a GPT-2 config with
6 layers, 768 wide, random weights: real compute for benchmarks. Both are seeded, so a build is
the same every time on one machine.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textnlp_jobs.inference.corpus import python_docstrings

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelRecipe:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    train_steps: int
    description: str


RECIPES: dict[str, ModelRecipe] = {
    "demo": ModelRecipe(2, 128, 4, 512, 4096, 300, "2-layer GPT-2 trained briefly on Python docstrings"),
    "small": ModelRecipe(6, 768, 12, 1024, 8192, 0, "6-layer, 768-wide GPT-2 with random weights"),
    # Only for tests: builds in about a second.
    "tiny": ModelRecipe(2, 32, 2, 256, 512, 30, "2-layer, 32-wide GPT-2 for tests"),
}


def build_model(
    recipe_name: str, target: Path, *, seed: int = 1234, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a ``from_pretrained``-loadable model directory (safetensors) at ``target``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    recipe = RECIPES[recipe_name]
    random.seed(seed)
    torch.manual_seed(seed)
    corpus = python_docstrings()

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                        pad_token=EOS, model_max_length=recipe.n_positions)
    tokenizer.padding_side = "left"

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd,
        n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    if recipe.train_steps:
        _train(model, tokenizer, corpus, recipe.train_steps, seed, progress)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    log.info("model_built recipe=%s path=%s params=%d", recipe_name, target, model.num_parameters())
    return target


def _train(model, tokenizer, corpus: list[str], steps: int, seed: int,  # type: ignore[no-untyped-def]
           progress: Callable[[int, int], None] | None) -> None:
    import torch

    seq_len, batch = 64, 16
    ids: list[int] = []
    for paragraph in corpus:
        ids.extend(tokenizer.encode(paragraph))
        ids.append(tokenizer.eos_token_id)
    data = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=chunk, labels=chunk).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps)
        if step % 100 == 0:
            log.info("bootstrap_train step=%d loss=%.3f", step, loss.item())
