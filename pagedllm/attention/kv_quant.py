"""fp8 KV cache (``--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2``) and its scaling factors.

A cache entry stores ``x / scale`` rounded to fp8 (clamped to the format's finite range);
readers multiply by ``scale`` again. One scale per layer for K and one for V (per tensor):
1.0 unless ``--quantization-param-path`` names a JSON file in the layout vLLM's
quantization tools write::

    {"kv_cache": {"dtype": "float8_e4m3fn",
                  "scaling_factor": {"0": {"0": 0.031, "1": 0.027, ...}}}}

(outer key: tensor-parallel rank, inner key: layer index; the same factor serves K and V).
Kernels fold the scales into the attention math instead of rescaling every element: the K
scale multiplies the score scale, the V scale multiplies the output.
"""
from __future__ import annotations

import json
import os

import torch

_FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2}
_JSON_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for ``--kv-cache-dtype`` ('auto': the model's dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    return _FP8[kv_cache_dtype]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x / scale in fp8, saturated to the largest finite value (plain casts give NaN)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def load_kv_scales(path: str | None, num_layers: int, tp_rank: int,
                   cache_dtype: torch.dtype) -> list[tuple[float, float]]:
    """Per-layer (k_scale, v_scale); errors name ``--quantization-param-path``."""
    flag = "--quantization-param-path"
    if path is None:
        return [(1.0, 1.0)] * num_layers
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
        section = data["kv_cache"]
        factors = section["scaling_factor"][str(tp_rank)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{flag} {path!r}: expected {{'kv_cache': {{'dtype': ..., "
                         f"'scaling_factor': {{'<tp rank>': {{'<layer>': factor}}}}}}}} "
                         f"with an entry for rank {tp_rank} ({type(exc).__name__}: {exc})") from exc
    declared = _JSON_DTYPES.get(section.get("dtype"))
    if section.get("dtype") is not None and declared != cache_dtype:
        raise ValueError(f"{flag} {path!r} holds scales for {section.get('dtype')!r} but the KV "
                         f"cache is {str(cache_dtype).removeprefix('torch.')}; pass the matching "
                         "--kv-cache-dtype (fp8_e4m3 or fp8_e5m2)")
    scales = []
    for layer in range(num_layers):
        value = factors.get(str(layer))
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{flag} {path!r}: layer {layer} of rank {tp_rank} needs a positive "
                             f"scaling factor, got {value!r}")
        scales.append((float(value), float(value)))
    return scales
