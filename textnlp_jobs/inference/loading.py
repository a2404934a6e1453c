"""Reading a model directory: what it holds (for the registry) and how to load it (for engines).

Two layouts load: a Hugging Face directory with safetensors weights, and an int8 variant this
project wrote (``textnlp-quantization.json`` beside ``quantized.safetensors``, see quantize.py).
Pickled ``.bin`` weights are refused: loading them runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textnlp_jobs.errors import ModelRegistrationError

QUANTIZATION_FILE = "textnlp-quantization.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the registry records about a loadable directory."""

    architecture: str
    model_type: str
    dtype: str
    parameter_count: int
    max_positions: int | None
    special_tokens: dict[str, Any]
    quantization: str | None
    # Why it cannot join continuous batches (``decoders.why_not_row_by_row``), or None.
    static_only_reason: str | None = None
    # What its generation_config.json sets that jobs do not follow (``generation_defaults``).
    ignored_generation_defaults: dict[str, Any] = field(default_factory=dict)


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position scheme allows, whatever the family calls it
    (GPT-2 ``n_positions`` is mapped onto ``max_position_embeddings`` by its config)."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def quantization_of(path: Path) -> dict[str, Any] | None:
    """The quantization record of a variant this project wrote, None for a plain directory."""
    marker = path / QUANTIZATION_FILE
    if not marker.is_file():
        return None
    record: dict[str, Any] = json.loads(marker.read_text())
    return record


def check_files(path: Path) -> None:
    """Refuse a directory that lacks a file loading needs, naming the file."""
    if not path.is_dir():
        raise ModelRegistrationError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelRegistrationError(f"missing config.json in {path}")
    quantized = quantization_of(path)
    if quantized is not None:
        weights = path / str(quantized.get("weights", ""))
        if not weights.is_file():
            raise ModelRegistrationError(f"missing weights: {weights.name} named by {QUANTIZATION_FILE} in {path}")
    else:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelRegistrationError(f"missing weights: {missing[0]} (listed in {index.name}) in {path}")
        elif not any(path.glob("*.safetensors")):
            pickled = sorted(p.name for p in path.glob("*.bin"))
            if pickled:
                raise ModelRegistrationError(
                    f"missing weights: model.safetensors in {path} (found only pickled {pickled[0]}; "
                    "convert it to safetensors, pickled weights are never loaded)")
            raise ModelRegistrationError(f"missing weights: model.safetensors in {path}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelRegistrationError(f"missing tokenizer: none of {', '.join(_TOKENIZER_FILES)} in {path}")


def check_architecture(path: Path) -> str:
    """The config's ``model_type``, if transformers has a causal LM for it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # type: ignore[attr-defined]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelRegistrationError(f"config.json in {path} is not readable JSON: {error}") from None
    model_type = raw.get("model_type")
    declared = ", ".join(raw.get("architectures") or []) or "none declared"
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelRegistrationError(
            f"unsupported architecture: model_type {model_type!r} ({declared}) in {path / 'config.json'} "
            "is not one this version of transformers knows")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelRegistrationError(
            f"unsupported architecture: {model_type!r} ({declared}) has no causal language model in transformers")
    return model_type


def load_tokenizer(path: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off for the block. Since 5.0 ``from_pretrained`` draws a
    "Loading weights" bar on stderr: in a CLI command (``models bootstrap``, the demo's first
    build, ``models register``) it broke the one-line output, and in a worker's log it is a line of
    carriage returns. Warnings stay: a user's model that loads with missing weights should say so."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(path: Path, dtype: str = "auto") -> Any:
    """The model in ``path`` on the CPU, in eval mode, from either layout. A float model loads in
    ``dtype`` ("auto": the one its ``config.json`` records); an int8 variant keeps its own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if quantization_of(path) is not None:
        from textnlp_jobs.inference.quantize import load_quantized

        if dtype != "auto":
            log.warning("dtype_ignored path=%s dtype=%s reason=int8_variant", path, dtype)
        return load_quantized(path)
    from transformers import AutoModelForCausalLM

    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.eval()
    return model


# x86 flags of the CPUs that compute in these dtypes natively. Without them torch emulates the
# type: on the development machine (AVX2 only) bfloat16 decoding ran 4x slower than float32 for a
# 6x768 Llama and 48x slower for GPT-2, whose Conv1D layers go through addmm (bench/results/
# cpu-2core-dtype.txt); on one with avx512_bf16 the same Llama ran 1.9x faster.
_NATIVE_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def emulated_on_this_cpu(dtype: str, cpuinfo: str | None = None) -> bool:
    """Whether this CPU lacks the instructions for ``dtype`` (``cpuinfo``: /proc/cpuinfo's text).
    False where that cannot be told: a dtype without such flags, no x86 ``flags`` line."""
    wanted = _NATIVE_CPU_FLAGS.get(dtype)
    if not wanted:
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and not any(flag in flags for flag in wanted)


def eos_token_id(tokenizer: Any, config: Any) -> int | None:
    """The end-of-sequence id: the tokenizer's, else the config's (the first of a list)."""
    value = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return int(value) if value is not None else None


def stop_token_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """Every id that ends a job: the end-of-sequence id first, then each other id the model's
    config.json or generation_config.json names. Chat models end a turn with a token of their own
    (``<|eot_id|>``, ``<end_of_turn>``, ``<|im_end|>``) that only generation_config.json lists;
    stopping at the tokenizer's one alone ran every chat reply on to its max_new_tokens. Ids
    outside the model's embedding are left out: the model cannot write them."""
    rows = int(model.get_input_embeddings().num_embeddings)
    found: list[int] = []
    for value in (eos_token_id(tokenizer, model.config), getattr(model.config, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and 0 <= int(token) < rows and int(token) not in found:
                found.append(int(token))
    return tuple(found)


# generation_config.json keys that do not change which tokens a job gets (token ids are honoured
# through ``stop_token_ids``; lengths come from the job; caching and output flags are the engine's).
_NEUTRAL_GENERATION_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "use_cache", "cache_implementation", "cache_config", "max_length", "max_new_tokens",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "num_return_sequences", "trust_remote_code",
})


def generation_defaults(model: Any) -> dict[str, Any]:
    """The decoding defaults a model's generation_config.json sets (``temperature``,
    ``repetition_penalty``...) that this system does not apply: a job decodes with its own
    settings alone, in static and continuous batches alike. For ``models register`` to say so."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {key: value for key, value in sorted(config.to_diff_dict().items())
            if key not in _NEUTRAL_GENERATION_KEYS and value is not None}


def inspect_directory(path: Path) -> ModelInfo:
    """Load ``path`` as a worker would and describe it; ``ModelRegistrationError`` saying what is
    wrong (missing file, unknown architecture, tokenizer that does not fit) otherwise."""
    check_files(path)
    model_type = check_architecture(path)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as error:  # the tokenizer backends raise many kinds
        raise ModelRegistrationError(f"tokenizer in {path} does not load: {type(error).__name__}: {error}") from None
    try:
        model = load_model(path)
    except ModelRegistrationError:
        raise
    except Exception as error:
        raise ModelRegistrationError(f"model in {path} does not load: {type(error).__name__}: {error}") from None
    rows = int(model.get_input_embeddings().num_embeddings)
    if len(tokenizer) > rows:
        raise ModelRegistrationError(
            f"mismatched tokenizer: it has {len(tokenizer)} tokens but the model's embedding has {rows} rows")
    eos = eos_token_id(tokenizer, model.config)
    if eos is None:
        raise ModelRegistrationError("no end-of-sequence token: neither the tokenizer nor config.json names one")
    special: dict[str, Any] = {}
    for name in _SPECIAL:
        token = getattr(tokenizer, name, None)
        token_id = getattr(tokenizer, f"{name}_id", None)
        if token_id is not None and not 0 <= int(token_id) < rows:
            raise ModelRegistrationError(f"mismatched tokenizer: {name} id {token_id} is outside the model's "
                                         f"{rows} embedding rows")
        special[name] = None if token is None else str(token)
        special[f"{name}_id"] = None if token_id is None else int(token_id)
    special["eos_token_id"] = eos
    special["stop_token_ids"] = list(stop_token_ids(tokenizer, model))
    special["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
    quantized = quantization_of(path)
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    if quantized is not None:
        dtype, parameters = str(quantized.get("dtype", "int8")), int(quantized.get("parameter_count", 0))
    else:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        parameters = int(model.num_parameters())
    from textnlp_jobs.inference.decoders import why_not_row_by_row

    return ModelInfo(
        architecture=str(architectures[0]), model_type=model_type, dtype=dtype, parameter_count=parameters,
        max_positions=max_positions(model.config), special_tokens=special,
        quantization=None if quantized is None else str(quantized.get("method")),
        static_only_reason=why_not_row_by_row(model), ignored_generation_defaults=generation_defaults(model),
    )
