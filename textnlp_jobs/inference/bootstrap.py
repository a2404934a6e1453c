"""Build the project's own models locally, since none can be downloaded.

``demo``: a tokenizer trained on Python's docstrings and a 2-layer GPT-2 trained on them for a few
hundred steps, so its output looks like text. ``small``: the same tokenizer and a GPT-2 config with
6 layers, 768 wide, random weights: real compute for benchmarks. Both are seeded, so a build is
the same every time on one machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from textnlp_jobs.errors import ErrorCode, TextNLPError
from textnlp_jobs.inference.corpus import python_docstrings
from textnlp_jobs.settings import Settings

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
    # What a newcomer should be told while it builds (on a 2-core CPU).
    build_note: str = ""


RECIPES: dict[str, ModelRecipe] = {
    "demo": ModelRecipe(2, 128, 4, 512, 4096, 300, "2-layer GPT-2 trained briefly on Python docstrings",
                        "training a 1M-parameter GPT-2 on Python's docstrings for 300 steps: 1-3 minutes on a CPU, "
                        "once per machine"),
    "small": ModelRecipe(6, 768, 12, 1024, 8192, 0, "6-layer, 768-wide GPT-2 with random weights",
                         "a 6-layer GPT-2 with random weights (for benchmarks): under a minute"),
    # For benchmarks: small's depth at a width a CPU computes quickly, so on a CPU its decode steps
    # cost about what small's cost on a GPU, and the system's per-step and per-join costs show.
    "narrow": ModelRecipe(6, 64, 4, 1024, 8192, 0, "6-layer, 64-wide GPT-2 with random weights",
                          "a 6-layer, 64-wide GPT-2 with random weights (for benchmarks): seconds"),
    # For benchmarks: small's depth at a width and vocabulary so small that a CPU's decode step
    # costs what its operator launches cost, nearly whatever the rows, as small's steps do on a GPU.
    "launch": ModelRecipe(6, 32, 2, 1024, 512, 0, "6-layer, 32-wide GPT-2 with a 512-token vocabulary",
                          "a 6-layer, 32-wide GPT-2 with random weights (for benchmarks): seconds"),
    # Only for tests and quick checks: builds in seconds.
    "tiny": ModelRecipe(2, 32, 2, 256, 512, 30, "2-layer, 32-wide GPT-2 for tests",
                        "a 2-layer, 32-wide GPT-2 trained for 30 steps (for tests): seconds"),
}


@dataclass(frozen=True)
class Bootstrapped:
    """A model built (or taken from the cache) and registered."""

    name: str
    version: str
    path: Path
    from_cache: bool


def recipe_key(name: str, seed: int = 1234) -> str:
    """What a build depends on, hashed: the recipe, the seed, Python (the corpus is its docstrings)
    and the libraries that train and save. Same key, same files."""
    versions = {}
    for package in ("torch", "transformers", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "?"
    facts = {"recipe": asdict(RECIPES[name]) | {"build_note": None}, "seed": seed,
             "python": list(sys.version_info[:2]), **versions}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def bootstrap_model(settings: Settings, name: str, *,
                    progress: Callable[[int, int], None] | None = None) -> Bootstrapped:
    """Build model ``name`` into the store and register it. A build is cached under
    ``settings.model_cache_dir()`` keyed by ``recipe_key``, so a second home on the same machine
    copies it in seconds instead of training again."""
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference import store

    if name not in RECIPES:
        raise TextNLPError(f"no recipe for model {name!r} (known: {', '.join(RECIPES)})",
                           code=ErrorCode.MODELS_UNKNOWN_RECIPE)
    recipe = RECIPES[name]
    from_cache = False

    def build(target: Path) -> None:
        nonlocal from_cache
        from_cache = build_cached(name, target, settings.model_cache_dir(), progress=progress)

    path = store.build_into_store(settings.model_store_dir(), name, build)
    with session_factory(settings).begin() as session:
        version = store.register_version(session, name, path, description=recipe.description)
        return Bootstrapped(name, version.version, path, from_cache)


def cached_build(cache: Path | None, name: str) -> Path | None:
    """Where ``cache`` keeps the build of recipe ``name`` (None without a cache); it may not exist yet."""
    return cache / f"{name}-{recipe_key(name)}" if cache is not None else None


def build_cached(name: str, target: Path, cache: Path | None, *,
                 progress: Callable[[int, int], None] | None = None) -> bool:
    """Write model ``name`` at ``target``: a copy from ``cache`` when it holds this recipe's build,
    else a fresh build that then fills the cache. Returns True when it came from the cache."""
    cached = cached_build(cache, name)
    if cached is not None and cached.is_dir():
        shutil.copytree(cached, target, dirs_exist_ok=True)
        return True
    build_model(name, target, progress=progress)
    if cached is not None:
        _fill_cache(target, cached)
    return False


def _fill_cache(built: Path, cached: Path) -> None:
    """Copy a finished build into the cache; a half-written copy is never visible (rename)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        shutil.copytree(built, scratch, dirs_exist_ok=True)
        try:
            scratch.rename(cached)
        except OSError:  # another process filled it first
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as error:  # a cache we cannot write is only slower next time
        log.warning("model_cache_unwritable path=%s error=%s", cached, error)


def build_model(
    recipe_name: str, target: Path, *, seed: int = 1234, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write a ``from_pretrained``-loadable model directory (safetensors) at ``target``."""
    from transformers.utils import logging as hf_logging

    from textnlp_jobs.inference.loading import no_progress_bars

    # transformers' notices (sequence longer than the model, default loss, shard-writing bars)
    # are about its general use, not this build; a newcomer would read them as faults.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_progress_bars():
            return _build(recipe_name, target, seed, progress)
    finally:
        hf_logging.set_verbosity(verbosity)


def _build(recipe_name: str, target: Path, seed: int, progress: Callable[[int, int], None] | None) -> Path:
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
        loss = model(input_ids=chunk, attention_mask=torch.ones_like(chunk), labels=chunk).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps)
        if step % 100 == 0:
            log.info("bootstrap_train step=%d loss=%.3f", step, loss.item())
