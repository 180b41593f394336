"""Whether the fused Triton ops (``triton_ops``) serve a tensor: CUDA tensors when Triton
imports and ``PAGEDLLM_DISABLE_FUSED_OPS`` is unset (the torch code then serves as oracle).
``linear`` sends one-row bf16/fp16 matmuls (batch-1 decode) whose weight shape has a tuned
config (``triton_ops.GEMV_CONFIGS``) to the Triton GEMV; ``PAGEDLLM_GEMV=off`` keeps every
shape on cuBLAS, ``PAGEDLLM_GEMV=all`` sends every shape to the GEMV (A/B runs, tests)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from pagedllm.switches import switches

_OPS = None
_CHECKED = False


def ops():
    global _OPS, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        if switches().fused_ops:
            try:
                from pagedllm.layers import triton_ops
                _OPS = triton_ops
            except ImportError:
                _OPS = None
    return _OPS


def use(x: torch.Tensor) -> bool:
    return x.is_cuda and ops() is not None


_GEMV: str | None = None


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    global _GEMV
    if _GEMV is None:
        _GEMV = switches().gemv
    if _GEMV == "off" or not (x.is_cuda and x.dim() == 2 and x.shape[0] == 1
                              and x.dtype in (torch.bfloat16, torch.float16)
                              and weight.dtype == x.dtype and weight.is_cuda
                              and weight.stride(1) == 1 and x.stride(1) == 1
                              and ops() is not None):
        return False
    return _GEMV == "all" or tuple(weight.shape) in ops().GEMV_CONFIGS


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] (one Triton kernel for 2-D CUDA tensors)."""
    if use(x) and x.dim() == 2 and x.stride(-1) == 1:
        return ops().silu_and_mul(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gated_silu: bool = False, fp32_out: bool = False) -> torch.Tensor:
    """x @ weight^T (+ bias); ``gated_silu``: then silu(first half) * second half, fused
    into the GEMV's pass on one-row CUDA steps. ``fp32_out`` (logits): the result in x's
    dtype, then as fp32 (the GEMV stores it so, in the same pass)."""
    if use_gemv(x, weight):
        return ops().gemv(x, weight, bias, gated=gated_silu,
                          out_dtype=torch.float32 if fp32_out else None)
    out = F.linear(x, weight, bias)
    out = silu_and_mul(out) if gated_silu else out
    return out.float() if fp32_out else out
