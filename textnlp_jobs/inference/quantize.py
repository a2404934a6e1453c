"""int8 dynamic quantization for CPU serving, stored without pickle, and the gate a variant must pass.

GPT-2's blocks are transformers ``Conv1D`` (weight stored as ``in x out``), not ``nn.Linear``, so
quantizing ``{nn.Linear}`` alone would touch only the output head. Every ``Conv1D`` is first turned
into the equivalent ``nn.Linear`` (weight transposed), then every ``nn.Linear`` gets per-channel
symmetric int8 weights with activations quantized on the fly (torch's dynamic quantization, run by
fbgemm/oneDNN on x86).

``save_pretrained`` cannot write such a model. The variant directory holds the source's config and
tokenizer files, ``quantized.safetensors`` (int8 weights, per-channel scales and zero points of each
quantized layer, every other tensor in float) and ``textnlp-quantization.json`` naming the layers;
``load_quantized`` rebuilds the model from the config and fills it in. Nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from textnlp_jobs.errors import ModelStoreError
from textnlp_jobs.inference.loading import QUANTIZATION_FILE

METHOD = "int8-dynamic"
WEIGHTS_FILE = "quantized.safetensors"
FORMAT = 1
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "*.bin", QUANTIZATION_FILE)


def convert_conv1d(model: Any, only: set[str] | None = None) -> list[str]:
    """Replace transformers ``Conv1D`` layers by the equivalent ``nn.Linear``; returns their names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D) or (only is not None and name not in only):
            continue
        linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        converted.append(name)
    return converted


def _quantize_in_place(model: Any, names: list[str]) -> Any:
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "qnnpack"
    return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8,
                            inplace=True)


def quantize_model(model: Any) -> tuple[Any, dict[str, Any]]:
    """The int8 dynamic version of a float CPU model (changed in place), and its record."""
    import torch

    parameters = int(model.num_parameters())
    converted = convert_conv1d(model)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    _quantize_in_place(model, names)
    record = {"method": METHOD, "format": FORMAT, "weights": WEIGHTS_FILE, "conv1d": converted, "modules": names,
              "dtype": "int8", "parameter_count": parameters}
    return model, record


def _quantized_layers(model: Any) -> dict[str, Any]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: module for name, module in model.named_modules() if isinstance(module, DynamicLinear)}


def _is_under(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def save_quantized(model: Any, record: dict[str, Any], source: Path, target: Path) -> Path:
    """Write the variant directory: ``source``'s config and tokenizer files plus the int8 weights."""
    import torch
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not any(file.match(pattern) for pattern in _WEIGHT_FILES):
            shutil.copy2(file, target / file.name)
    layers = _quantized_layers(model)
    tensors: dict[str, Any] = {}
    for name, layer in layers.items():
        weight, bias = layer._packed_params._weight_bias()
        tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
        tensors[f"{name}.scales"] = weight.q_per_channel_scales().to(torch.float32).contiguous()
        tensors[f"{name}.zero_points"] = weight.q_per_channel_zero_points().to(torch.int32).contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if _is_under(key, set(layers)) or not isinstance(value, torch.Tensor) or value.is_quantized:
            continue
        # Tied tensors (GPT-2's embedding and head) are stored once; loading re-ties them.
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous().clone()
    save_file(tensors, str(target / WEIGHTS_FILE), metadata={"format": "pt", "method": METHOD})
    (target / QUANTIZATION_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return target


def load_quantized(path: Path) -> Any:
    """Rebuild an int8 variant written by ``save_quantized`` (a fresh process needs only the files)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    record = json.loads((path / QUANTIZATION_FILE).read_text())
    if record.get("method") != METHOD or record.get("format") != FORMAT:
        raise ModelStoreError(f"{path}: unknown quantization {record.get('method')!r} format {record.get('format')}")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    convert_conv1d(model, set(record["conv1d"]))
    _quantize_in_place(model, list(record["modules"]))
    tensors = load_file(str(path / WEIGHTS_FILE))
    layers = _quantized_layers(model)
    if set(layers) != set(record["modules"]):
        raise ModelStoreError(f"{path}: quantized layers do not match {QUANTIZATION_FILE}")
    for name, layer in layers.items():
        try:
            weight = torch._make_per_channel_quantized_tensor(
                tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales").to(torch.float64),
                tensors.pop(f"{name}.zero_points").to(torch.int64), 0)
        except KeyError as absent:
            raise ModelStoreError(f"{path}: {WEIGHTS_FILE} lacks {absent}") from None
        layer.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    expected = {k: v for k, v in model.state_dict().items()
                if not _is_under(k, set(layers)) and isinstance(v, torch.Tensor) and not v.is_quantized}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelStoreError(f"{path}: unexpected tensors in {WEIGHTS_FILE}: {unexpected[:3]}")
    given = {expected[k].data_ptr() for k in tensors}
    missing = sorted(k for k, v in expected.items() if k not in tensors and v.data_ptr() not in given)
    if missing:  # a tied tensor is stored once under one of its names
        raise ModelStoreError(f"{path}: {WEIGHTS_FILE} lacks {missing[:3]}")
    with torch.no_grad():  # load_state_dict would ask the quantized layers for keys they do not have
        for key, value in tensors.items():
            expected[key].copy_(value)
    return model
