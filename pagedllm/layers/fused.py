"""Whether the fused Triton ops (``triton_ops``) serve a tensor: CUDA tensors when Triton
imports and ``PAGEDLLM_DISABLE_FUSED_OPS`` is unset (the torch code then serves as oracle)."""
from __future__ import annotations

import os

import torch

_OPS = None
_CHECKED = False


def ops():
    global _OPS, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        if not os.environ.get("PAGEDLLM_DISABLE_FUSED_OPS"):
            try:
                from pagedllm.layers import triton_ops
                _OPS = triton_ops
            except ImportError:
                _OPS = None
    return _OPS


def use(x: torch.Tensor) -> bool:
    return x.is_cuda and ops() is not None
