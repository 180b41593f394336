"""Which quantized matmul runs: the Triton kernels on CUDA, the torch references elsewhere.

- ``wna16_apply``: GPTQ / AWQ / compressed-tensors int4 and int8 weights on CUDA go through
  ``triton_wna16`` (Triton importable and ``PAGEDLLM_DISABLE_FUSED_OPS`` unset, as for the
  other fused ops). The kernel's view of a layer's tensors is cached on the layer and rebuilt
  when the tensors move (``--cpu-offload-gb`` streams them per call).
- ``w4mma_for`` / ``w4mma_apply``: 4-bit GPTQ / AWQ / compressed-tensors layers whose groups
  are whole 64-input tiles are repacked at load on CUDA into the layout of ``triton_w4mma``
  (register-fragment mma up to ``MMA_MAX_ROWS`` rows, a GEMM reading the layout above,
  dequantize + cuBLAS for prefills); with ``PAGEDLLM_W4_MMA=0`` they stay on
  ``triton_wna16``.
- ``triton_nf4_for``: bitsandbytes NF4 / FP4 weights on CUDA go through ``triton_nf4``.
- ``triton_gguf_for``: GGUF Q4_K / Q5_K / Q6_K / Q8_0 layers on CUDA go through
  ``triton_gguf`` (the other block types through the torch reference).
- ``fp8_scaled_mm_supported``: whether ``torch._scaled_mm`` can run fp8 W8A8 on a device
  (CUDA compute capability >= 8.9).
Each method logs its choice once.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def triton_wna16():
    """The ``triton_wna16`` module when fused CUDA kernels are enabled, else None."""
    from pagedllm.layers import fused
    if fused.ops() is None:
        return None
    from pagedllm.quant import triton_wna16 as module
    return module


def _serving_wna16(x: torch.Tensor):
    """``triton_wna16`` (whose presence says the fused CUDA kernels are on) when they serve
    ``x`` (CUDA, a float dtype), else None."""
    return triton_wna16() if _serves(x) else None


def triton_nf4_for(x: torch.Tensor):
    """The ``triton_nf4`` module (bitsandbytes 4-bit GEMV, GEMM and dequantize kernels) when
    the fused CUDA kernels serve ``x``, else None."""
    if _serving_wna16(x) is None:
        return None
    from pagedllm.quant import triton_nf4 as module
    log_once("bitsandbytes 4-bit: Triton kernels (GEMV at one row, GEMM up to "
             f"{module.GEMM_MAX_ROWS} rows; more: dequantized by one launch, then cuBLAS)")
    return module


def triton_gguf_for(x: torch.Tensor, kind: str):
    """The ``triton_gguf`` module (one-row GEMV and one-launch dequantize of GGML blocks)
    when the fused CUDA kernels serve ``x`` and it covers the block type ``kind``, else
    None."""
    if _serving_wna16(x) is None:
        return None
    from pagedllm.quant import triton_gguf as module
    if kind not in module.KINDS:
        return None
    log_once(f"GGUF {kind}: Triton kernels (GEMV at one row; more rows: dequantized by one "
             "launch, then cuBLAS)")
    return module


def _on_cuda(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def _serves(x: torch.Tensor) -> bool:
    return _on_cuda(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def wna16_for(tensor: torch.Tensor):
    """``triton_wna16`` when its kernels will serve this layer's tensors (CUDA, Triton,
    fused ops enabled): a method may repack its weight for them at load. Else None."""
    return triton_wna16() if _on_cuda(tensor) else None


def wna16_apply(layer: nn.Module, x: torch.Tensor, key: torch.Tensor,
                build: Callable[[object], object], what: str,
                bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor | None:
    """x @ W (+ bias, then the gated SiLU) through the Triton kernels, or None where they do
    not serve (CPU, no Triton).
    ``build(module)`` makes the layer's ``WNA16Weight``; ``key`` is a tensor of the layer
    whose storage identifies the cached one."""
    module = _serving_wna16(x)
    if module is None:
        return None
    cached = getattr(layer, "_wna16", None)
    if cached is None or cached[0] != key.data_ptr():
        cached = (key.data_ptr(), build(module))
        layer._wna16 = cached
        log_once(f"{what}: Triton W{cached[1].bits}A16 kernels (GEMV at one row, GEMM above, "
                 "dequantization fused)")
    return module.wna16_matmul(x, cached[1], bias=bias, gated=gated)


def w4mma_for(tensor: torch.Tensor, bits: int, act_order: bool, k: int, n: int,
              group_size: int, what: str):
    """``triton_w4mma`` when a layer's weight (on CUDA, fused ops on, ``PAGEDLLM_W4_MMA`` not 0)
    can take its layout, else None: the method then repacks the weight at load."""
    from pagedllm.switches import switches
    if wna16_for(tensor) is None or not switches().w4_mma:
        return None
    from pagedllm.quant import triton_w4mma as module
    if not module.eligible(bits, act_order, k, n, group_size):
        return None
    log_once(f"{what}: tensor-core W4A16 kernels (mma.sync register fragments up to "
             f"{module.MMA_MAX_ROWS} rows, a wgmma GEMM below {module.DEQUANT_MIN_ROWS}; more: "
             "dequantized by one launch, then cuBLAS)")
    return module


def w4mma_apply(x: torch.Tensor, tensors: tuple, group_size: int, zero_offset: int,
                bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x @ W (+ bias, then the gated SiLU) for a layer repacked by ``w4mma_for``'s module:
    ``tensors`` its (words, GPTQ-packed zeros [G, N/8] or None, scales [G, N]). Where the
    kernels do not serve x (fp32), the layout's torch reference."""
    from pagedllm.quant import triton_w4mma as module
    words, zeros, scales = tensors
    if not (_on_cuda(x) and x.dtype in (torch.float16, torch.bfloat16)):
        from pagedllm.quant.gptq import matmul_dequantized
        weight = module.dequantize_reference(words, zeros, scales, group_size, zero_offset)
        return matmul_dequantized(x, weight.to(scales.dtype), bias, gated)
    return module.w4_matmul(x, words, zeros, scales, group_size, zero_offset, bias=bias,
                            gated=gated)


def fp8_scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor-core matmuls (``torch._scaled_mm``) need compute capability >= 8.9."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
