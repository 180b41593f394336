"""A Triton dequantize kernel for the GGML block types of a Q4_K_M / Q5_K_M / Q8_0 file
(Q4_K, Q5_K, Q6_K, Q8_0): a GGUF linear layer on CUDA is dequantized by one launch into
the activations' dtype, then multiplied by cuBLAS (the torch reference in ``gguf_dequant``
took some fifteen elementwise launches per call).

Layouts (llama.cpp's ``ggml-common.h``, as ``gguf_dequant`` reads them), element e of a block:
- Q4_K (144 bytes): d, dmin (fp16), 12 bytes of 6-bit sub-block scales and mins, 128 bytes
  of codes; e's code is nibble (e % 64) // 32 of byte 16 + 32 (e // 64) + e % 32, its
  sub-block e // 32; value d sc q - dmin m.
- Q5_K (176 bytes): Q4_K's fields, then 32 bytes of fifth bits (bit e // 32 of byte e % 32)
  before the 128 bytes of codes.
- Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d; in
  half h = e // 128, t = e % 128: nibble t // 64 of byte 64 h + t % 64, bit pair t // 32 of
  byte 128 + 32 h + t % 32; value d scale[e // 16] (q - 32).
- Q8_0 (34 bytes): d, then 32 int8 codes; value d q.
Each program writes one block of ``BLOCK_R`` rows; bytes are gathered per element (they
repeat within a block, so the loads hit L1). The torch reference is the oracle
(tests/kernels/test_gguf_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# name -> (KIND constant, elements per block, bytes per block)
KINDS = {"Q4_K": (0, 256, 144), "Q5_K": (1, 256, 176), "Q6_K": (2, 256, 210),
         "Q8_0": (3, 32, 34)}


@triton.jit
def _byte(base, offset):
    return tl.load(base + offset).to(tl.int32)


@triton.jit
def _half(base, offset):
    lo = tl.load(base + offset).to(tl.int32)
    hi = tl.load(base + offset + 1).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k4_scale_min(base, sb):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block ``sb`` (0-7)."""
    first = sb < 4
    j = sb % 4
    low_s = _byte(base, 4 + j)      # bytes 0-3 of the field: scales 0-3 (+ top bits of 4-7)
    low_m = _byte(base, 8 + j)      # bytes 4-7: mins 0-3 (+ top bits of 4-7)
    packed = _byte(base, 12 + j)    # bytes 8-11: low nibble scale, high nibble min of 4-7
    scale = tl.where(first, low_s & 63, (packed & 15) | ((low_s >> 6) << 4))
    mins = tl.where(first, low_m & 63, (packed >> 4) | ((low_m >> 6) << 4))
    return scale.to(tl.float32), mins.to(tl.float32)


@triton.jit
def _block_values(base, e, KIND: tl.constexpr):
    """fp32 values of elements ``e`` (a [BLOCK_R, E] tensor) of the blocks at ``base``."""
    if KIND == 3:  # Q8_0
        q = _byte(base, 2 + e).to(tl.int8).to(tl.float32)
        return _half(base, 0 * e) * q
    if KIND == 2:  # Q6_K
        h, t = e // 128, e % 128
        low = (_byte(base, 64 * h + t % 64) >> (4 * (t // 64))) & 15
        high = (_byte(base, 128 + 32 * h + t % 32) >> (2 * (t // 32))) & 3
        scale = _byte(base, 192 + e // 16).to(tl.int8).to(tl.float32)
        return _half(base, 208 + 0 * e) * scale * ((low | (high << 4)) - 32).to(tl.float32)
    codes = 48 if KIND == 1 else 16  # Q5_K keeps its fifth bits before the codes
    q = (_byte(base, codes + 32 * (e // 64) + e % 32) >> (4 * ((e % 64) // 32))) & 15
    if KIND == 1:
        q = q | (((_byte(base, 16 + e % 32) >> (e // 32)) & 1) << 4)
    scale, mins = _k4_scale_min(base, e // 32)
    return _half(base, 0 * e) * scale * q.to(tl.float32) - _half(base, 2 + 0 * e) * mins


@triton.jit
def _gguf_dequant_kernel(w_ptr, out_ptr, R, stride_wr, stride_or, SIZE: tl.constexpr,
                         E: tl.constexpr, KIND: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    block = tl.program_id(1)
    rows_ok = rows < R
    safe = tl.where(rows_ok, rows, 0)  # masked rows read row 0's block (in bounds)
    e = tl.arange(0, E)[None, :] + tl.zeros((BLOCK_R, 1), dtype=tl.int32)
    base = w_ptr + safe[:, None].to(tl.int64) * stride_wr + block * SIZE
    values = _block_values(base, e, KIND)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_or + block * E + e,
             values.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None])


def dequantize(weight: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[rows, blocks, bytes] uint8 blocks of ``kind`` -> the [rows, blocks * elements]
    weight in ``dtype``, one launch."""
    code, elements, size = KINDS[kind]
    rows, blocks, nbytes = weight.shape
    if nbytes != size:
        raise ValueError(f"triton_gguf.dequantize: {kind} blocks are {size} bytes, got {nbytes}")
    weight = weight.contiguous()
    out = torch.empty(rows, blocks * elements, dtype=dtype, device=weight.device)
    block_r = 8 if elements == 256 else 32
    grid = (triton.cdiv(rows, block_r), blocks)
    _gguf_dequant_kernel[grid](weight, out, rows, weight.stride(0), out.stride(0), SIZE=size,
                               E=elements, KIND=code, BLOCK_R=block_r, num_warps=4)
    return out
