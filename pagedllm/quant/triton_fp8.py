"""Dynamic fp8 (e4m3) activation quantization in one Triton launch, for the fp8 W8A8 path.

``fp8.activation_scale`` + ``fp8.quantize_fp8`` in torch are about eight small kernels
(abs, max, divide, clamp, cast, divide, clamp, cast) per linear layer and step: in a batch-1
decode step of an 8B model that is ~1,000 launches, more time than the fp8 matmuls save.
Here one kernel reads x twice (max |x|, then x / scale rounded to e4m3, saturating at 448):
- per token: one program per row, scale [M, 1];
- per tensor: one program for the whole tensor (decode-sized inputs, ``PER_TENSOR_MAX``
  elements at most; larger ones keep the torch code), scale [1].
The torch functions stay the reference (tests/kernels/test_fp8_scaled_mm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
PER_TENSOR_MAX = 1 << 18  # elements one program quantizes per tensor (decode batches)


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, rows, cols, stride_x, stride_q,
                      rows_per_program, BLOCK: tl.constexpr):
    first = tl.program_id(0) * rows_per_program
    offs = tl.arange(0, BLOCK)
    peak = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(first, first + rows_per_program):
        for c in range(0, cols, BLOCK):
            ok = c + offs < cols
            x = tl.load(x_ptr + r * stride_x + c + offs, mask=ok, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.abs(x))
    scale = tl.maximum(tl.max(peak, axis=0) / 448.0, 1e-12)
    tl.store(scale_ptr + tl.program_id(0), scale)
    for r in range(first, first + rows_per_program):
        for c in range(0, cols, BLOCK):
            ok = c + offs < cols
            x = tl.load(x_ptr + r * stride_x + c + offs, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
            tl.store(q_ptr + r * stride_q + c + offs, q.to(q_ptr.dtype.element_ty), mask=ok)


def quantize_fp8_dynamic(x: torch.Tensor, per_token: bool,
                         fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """(x as e4m3 [M, K], fp32 scale [M, 1] per token or [1] per tensor) for a 2-D CUDA x,
    or None where this kernel does not serve (the caller runs the torch code)."""
    rows, cols = x.shape
    if x.stride(-1) != 1 or rows == 0 or (not per_token and rows * cols > PER_TENSOR_MAX):
        return None
    q = torch.empty(rows, cols, dtype=fp8_dtype, device=x.device)
    programs = rows if per_token else 1
    scale = torch.empty(programs, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(cols), 2048)
    _quant_fp8_kernel[(programs,)](x, q, scale, rows, cols, x.stride(0), q.stride(0),
                                   1 if per_token else rows, BLOCK=block,
                                   num_warps=4 if block >= 1024 else 2)
    return q, scale.view(-1, 1) if per_token else scale
