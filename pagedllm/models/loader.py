"""Builds a native model and fills it from a local Hugging Face directory.

Formats: ``safetensors`` (single file or sharded with an index), ``pt`` (``*.bin``), ``auto``
(safetensors if present, else .bin) and ``dummy`` (seeded random weights of the right shapes,
for profiling). Every parameter must be loaded: a missing tensor is an error naming it.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from typing import Iterator

import torch
from torch import nn

from pagedllm.distributed import get_tp_size
from pagedllm.layers.linear import MergedLinear
from pagedllm.models.registry import (architectures_supporting, require_support,
                                      resolve_model_class, supported_architectures)


def _matches(path: str, root: str, patterns: list[str]) -> bool:
    rel = os.path.relpath(path, root)
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def find_weight_files(model_path: str, load_format: str,
                      ignore_patterns: list[str] | None = None) -> tuple[list[str], str]:
    """The weight files to read and their format ("safetensors" or "pt")."""
    ignore = ignore_patterns or []
    formats = {"auto": ["safetensors", "pt"], "safetensors": ["safetensors"], "pt": ["pt"]}
    for fmt in formats[load_format]:
        index = os.path.join(model_path, "model.safetensors.index.json" if fmt == "safetensors"
                             else "pytorch_model.bin.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(model_path, n) for n in names]
        else:
            pattern = "*.safetensors" if fmt == "safetensors" else "*.bin"
            files = sorted(glob.glob(os.path.join(model_path, pattern)))
            files = [f for f in files if not f.endswith("training_args.bin")]
        files = [f for f in files if not _matches(f, model_path, ignore)]
        if files:
            return files, fmt
    raise ValueError(f"no weights for --load-format {load_format} found in {model_path} "
                     "(expected *.safetensors or *.bin files)")


def iterate_weights(files: list[str], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if fmt == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3,
                       high: float = 1e-3) -> None:
    """Seeded uniform weights. On CPU they are drawn in fp32 and cast; on an accelerator they
    are drawn in place on the device (an 8B model drawn on the host took over a minute)."""
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if not param.is_floating_point():  # packed ints: zeros (g_idx keeps its default)
            if not getattr(param, "optional", False):
                param.data.zero_()
            continue
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        if device.type == "cpu" or param.dtype.itemsize == 1:  # fp8 cannot be drawn in place
            values = torch.empty(param.shape, dtype=torch.float32, device=device).uniform_(
                low, high, generator=generators[device])
            param.data.copy_(values)
        else:
            param.data.uniform_(low, high, generator=generators[device])


def require_expert_quantization(model_class, method: str) -> None:
    """``--quantization <method>`` quantizes MoE expert weights only: a model without experts
    would run unquantized, so it is refused, naming the flag and the MoE architectures."""
    if not getattr(model_class, "supports_expert_quantization", False):
        raise ValueError(f"--quantization {method} quantizes mixture-of-experts expert weights "
                         f"and {model_class.__name__} has no experts; supported: "
                         f"{', '.join(architectures_supporting('expert_quantization'))}")


def _quantizable_architectures() -> list[str]:
    """Architectures whose class declares ``supports_quantization`` in its own body."""
    return [arch for arch in supported_architectures()
            if resolve_model_class([arch]).__dict__.get("supports_quantization", False)]


def _build(model_class, model_config) -> nn.Module:
    """The model, with the quant config for classes that declare quantization support (in
    their own body: a subclass adding e.g. MoE experts has layers no quant method covers);
    a method that quantizes only MoE experts (experts_int8) needs a class with experts."""
    quant_config = getattr(model_config, "quant_config", None)
    if quant_config is None:
        return model_class(model_config.hf_config, model_config.max_model_len)
    if quant_config.moe_only:
        require_expert_quantization(model_class, quant_config.name)
    elif not model_class.__dict__.get("supports_quantization", False):
        raise ValueError(f"{model_class.__name__} does not support --quantization "
                         f"{quant_config.name} yet; quantized checkpoints load for "
                         f"{', '.join(_quantizable_architectures())}")
    return model_class(model_config.hf_config, model_config.max_model_len,
                       quant_config=quant_config)


def _missing_fused_parts(model: nn.Module) -> list[str]:
    """Fused layers (q/k/v, gate/up) with a part no checkpoint tensor filled, e.g. a GPTQ
    checkpoint without ``k_proj.scales``."""
    missing: list[str] = []
    for module in model.modules():
        if isinstance(module, MergedLinear):
            missing += module.missing_parts()
    return missing


def process_after_loading(model: nn.Module) -> None:
    """Each linear layer's quant method finishes its weights (repack, quantize, check)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_after_loading(module)


def _checkpoint_weights(model_config, load_config) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the checkpoint: a GGUF file's dequantized tensors, else the
    safetensors / .bin files of the model directory."""
    if load_config.load_format == "gguf":
        from pagedllm.quant.gguf import iterate_gguf_weights
        return iterate_gguf_weights(model_config.model_path, model_config.hf_config,
                                    getattr(model_config, "quant_config", None))
    load_format = "auto" if load_config.load_format == "bitsandbytes" else \
        load_config.load_format
    files, fmt = find_weight_files(model_config.model_path, load_format,
                                   load_config.ignore_patterns)
    quant_config = getattr(model_config, "quant_config", None)
    weights = iterate_weights(files, fmt)
    return quant_config.checkpoint_stream(weights) if quant_config is not None else weights


def load_model(model_config, load_config, device: torch.device) -> nn.Module:
    hf_config = model_config.hf_config
    model_class = resolve_model_class(getattr(hf_config, "architectures", None))
    if get_tp_size() > 1:
        require_support(model_class, "tensor_parallel", "--tensor-parallel-size")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.torch_dtype)
    try:
        with torch.device(device):
            model = _build(model_class, model_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        loaded = model.load_weights(_checkpoint_weights(model_config, load_config))
        required = {n for n, p in model.named_parameters() if not getattr(p, "optional", False)}
        missing = sorted(required - loaded)
        if not missing:
            missing = _missing_fused_parts(model)
        if missing:
            raise ValueError(f"weights missing from the checkpoint in {model_config.model_path}: "
                             f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    process_after_loading(model)
    return model.eval()
