"""Triton kernels for the GGML block types of a Q4_K_M / Q5_K_M / Q8_0 file (Q4_K, Q5_K,
Q6_K, Q8_0): a GGUF linear layer on CUDA runs a GEMV that decodes each block where it reads
it (one-row inputs: batch-1 decode), or is dequantized by one launch into the activations'
dtype and multiplied by cuBLAS (more rows); the torch reference in ``gguf_dequant`` took some
fifteen elementwise launches per call.

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
Values are decoded as [rows, sub-blocks, length] tiles, so a sub-block's scale and a
block's d are read once at their own shape and broadcast; code bytes are gathered per
element (they repeat within a block: the loads hit L1). The dequantize kernel writes one
block of ``BLOCK_R`` rows a program; the GEMV sums a split of the blocks a program. The
torch reference is the oracle (tests/kernels/test_gguf_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# name -> (KIND constant, elements per block, bytes per block, sub-blocks, their length)
KINDS = {"Q4_K": (0, 256, 144, 8, 32), "Q5_K": (1, 256, 176, 8, 32),
         "Q6_K": (2, 256, 210, 16, 16), "Q8_0": (3, 32, 34, 1, 32)}


@triton.jit
def _byte(base, offset):
    return tl.load(base + offset).to(tl.int32)


@triton.jit
def _half_of(word, high: tl.constexpr):
    """The fp16 in the low (or high) 16 bits of an int32, as fp32."""
    if high:
        word = word >> 16
    return (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half(base, offset):
    lo = tl.load(base + offset).to(tl.int32)
    hi = tl.load(base + offset + 1).to(tl.int32)
    return _half_of(lo | (hi << 8), False)


@triton.jit
def _k4_unpack(low_s, low_m, packed, first):
    """Q4_K / Q5_K: the 6-bit scales and mins (fp32) of sub-blocks from byte j = sb % 4 of
    the 12-byte field's three parts (``low_s``: bytes 0-3, scales 0-3 + top bits of 4-7;
    ``low_m``: bytes 4-7, mins 0-3 + top bits of 4-7; ``packed``: bytes 8-11, low nibble
    scale and high nibble min of 4-7); ``first``: sb < 4."""
    scale = tl.where(first, low_s & 63, (packed & 15) | ((low_s >> 6) << 4))
    mins = tl.where(first, low_m & 63, (packed >> 4) | ((low_m >> 6) << 4))
    return scale.to(tl.float32), mins.to(tl.float32)


@triton.jit
def _k4_scale_min(base, sb):
    """Q4_K / Q5_K: the 6-bit scales and mins of sub-blocks ``sb`` (0-7), read byte by byte."""
    j = sb % 4
    return _k4_unpack(_byte(base, 4 + j), _byte(base, 8 + j), _byte(base, 12 + j), sb < 4)


@triton.jit
def _block_values(base, sb, i, KIND: tl.constexpr):
    """fp32 values [R, S, L] of the blocks at ``base`` ([R, 1, 1] pointers): sub-block ``sb``
    ([1, S, 1]), element ``i`` of it ([1, 1, L]); per-sub-block and per-block fields are
    read at their own shape and broadcast."""
    if KIND == 3:  # Q8_0
        q = _byte(base, 2 + sb * 32 + i).to(tl.int8).to(tl.float32)
        return _half(base, 0) * q
    if KIND == 2:  # Q6_K: sub-blocks of 16, e = 16 sb + i
        e = sb * 16 + i
        h, t = e // 128, e % 128
        low = (_byte(base, 64 * h + t % 64) >> (4 * (t // 64))) & 15
        high = (_byte(base, 128 + 32 * h + t % 32) >> (2 * (t // 32))) & 3
        scale = _half(base, 208) * _byte(base, 192 + sb).to(tl.int8).to(tl.float32)
        return scale * ((low | (high << 4)) - 32).to(tl.float32)
    codes = 48 if KIND == 1 else 16  # Q5_K keeps its fifth bits before the codes
    q = (_byte(base, codes + 32 * (sb // 2) + i) >> (4 * (sb % 2))) & 15
    if KIND == 1:
        q = q | (((_byte(base, 16 + i) >> sb) & 1) << 4)
    scale, mins = _k4_scale_min(base, sb)
    return (_half(base, 0) * scale) * q.to(tl.float32) - _half(base, 2) * mins


@triton.jit
def _gguf_dequant_kernel(w_ptr, out_ptr, R, stride_wr, stride_or, SIZE: tl.constexpr,
                         S: tl.constexpr, L: tl.constexpr, KIND: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    block = tl.program_id(1)
    rows_ok = rows < R
    safe = tl.where(rows_ok, rows, 0)  # masked rows read row 0's block (in bounds)
    sb = tl.arange(0, S)[None, :, None]
    i = tl.arange(0, L)[None, None, :]
    base = w_ptr + safe[:, None, None].to(tl.int64) * stride_wr + block * SIZE
    values = _block_values(base, sb, i, KIND)
    tl.store(out_ptr + rows[:, None, None].to(tl.int64) * stride_or + block * (S * L)
             + sb * L + i, values.to(out_ptr.dtype.element_ty),
             mask=rows_ok[:, None, None] & (sb >= 0) & (i >= 0))


@triton.jit
def _gguf_gemv_kernel(x_ptr, w_ptr, part_ptr, R, blocks, blocks_per_split, stride_wr,
                      stride_ps, SIZE: tl.constexpr, S: tl.constexpr, L: tl.constexpr,
                      KIND: tl.constexpr, BLOCK_R: tl.constexpr):
    # part[split, r] = sum over this split's blocks of W[r, block] . x[block]
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    rows_ok = rows < R
    safe = tl.where(rows_ok, rows, 0)
    sb = tl.arange(0, S)[None, :, None]
    i = tl.arange(0, L)[None, None, :]
    row_base = w_ptr + safe[:, None, None].to(tl.int64) * stride_wr
    acc = tl.zeros((BLOCK_R, S, L), dtype=tl.float32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, blocks)):
        x = tl.load(x_ptr + block * (S * L) + sb * L + i).to(tl.float32)
        acc += _block_values(row_base + block * SIZE, sb, i, KIND) * x
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(part_ptr + split * stride_ps + rows, total, mask=rows_ok)


@triton.jit
def _q4k_scale_min(w1, w2, w3, sb):
    """Q4_K: ``_k4_scale_min`` from the 12-byte field already loaded as three words (field
    byte j is byte j % 4 of word j // 4): elementwise, no loads, no reductions."""
    shift = (sb % 4) * 8
    return _k4_unpack((w1 >> shift) & 255, (w2 >> shift) & 255, (w3 >> shift) & 255, sb < 4)


@triton.jit
def _nibbles(words, high: tl.constexpr):
    """[R, 32] int32 words -> [R, 128] fp32 nibbles: element 4 j + b is the low (``high``:
    high) nibble of word j's byte b. Joined in registers, so a thread's four words become
    its sixteen values without a layout conversion."""
    s: tl.constexpr = 4 if high else 0
    q0, q1 = (words >> s) & 15, (words >> (8 + s)) & 15
    q2, q3 = (words >> (16 + s)) & 15, (words >> (24 + s)) & 15
    rows: tl.constexpr = words.shape[0]
    return tl.reshape(tl.join(tl.join(q0, q2), tl.join(q1, q3)), (rows, 128)).to(tl.float32)


@triton.jit
def _q4k_gemv_kernel(x_ptr, w_ptr, part_ptr, R, blocks, blocks_per_split, stride_wr,
                     stride_ps, BLOCK_R: tl.constexpr):
    # Q4_K blocks read as 36 int32 words (d and dmin, the 12 scale bytes, then 32 words of
    # codes, whole 16-byte vectors). Code byte e = 4 j + b (word j, byte b; c = e // 32)
    # holds element 64 c + e % 32 in its low nibble (sub-block 2 c) and 64 c + 32 + e % 32
    # in its high one (sub-block 2 c + 1). Every value d * scale * q - dmin * min times its
    # x goes into a [BLOCK_R, 128] accumulator (e): no reduction until the end.
    # part[split, r] as the GEMV.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    rows_ok = rows < R
    row_base = (w_ptr + tl.where(rows_ok, rows, 0).to(tl.int64) * stride_wr)[:, None]  # [R, 1]
    e = tl.arange(0, 128)[None, :]
    x_offs = 64 * (e // 32) + e % 32  # [1, 128]: the low nibbles' elements
    sub = 2 * (e // 32)  # and their sub-block
    acc = tl.zeros((BLOCK_R, 128), dtype=tl.float32)
    first = split * blocks_per_split
    for blk in range(first, tl.minimum(first + blocks_per_split, blocks)):
        base = row_base + blk * 36
        w0, w1, w2, w3 = tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3)
        words = tl.load(base + 4 + tl.arange(0, 32)[None, :])  # [R, 32]
        d, dmin = _half_of(w0, False), _half_of(w0, True)
        s_lo, m_lo = _q4k_scale_min(w1, w2, w3, sub)  # [R, 128]
        s_hi, m_hi = _q4k_scale_min(w1, w2, w3, sub + 1)
        x_lo = tl.load(x_ptr + blk * 256 + x_offs).to(tl.float32)
        x_hi = tl.load(x_ptr + blk * 256 + 32 + x_offs).to(tl.float32)
        q_lo, q_hi = _nibbles(words, False), _nibbles(words, True)
        acc += ((d * s_lo) * q_lo - dmin * m_lo) * x_lo + ((d * s_hi) * q_hi - dmin * m_hi) * x_hi
    tl.store(part_ptr + split * stride_ps + rows, tl.sum(acc, 1), mask=rows_ok)


def _check(weight: torch.Tensor, kind: str) -> tuple:
    code, elements, size, subs, length = KINDS[kind]
    if weight.shape[-1] != size:
        raise ValueError(f"triton_gguf: {kind} blocks are {size} bytes, got {weight.shape[-1]}")
    return code, elements, size, subs, length


def dequantize(weight: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """[rows, blocks, bytes] uint8 blocks of ``kind`` -> the [rows, blocks * elements]
    weight in ``dtype``, one launch."""
    code, elements, size, subs, length = _check(weight, kind)
    rows, blocks, _ = weight.shape
    weight = weight.contiguous()
    out = torch.empty(rows, blocks * elements, dtype=dtype, device=weight.device)
    block_r = 8 if elements == 256 else 32
    grid = (triton.cdiv(rows, block_r), blocks)
    _gguf_dequant_kernel[grid](weight, out, rows, weight.stride(0), out.stride(0), SIZE=size,
                               S=subs, L=length, KIND=code, BLOCK_R=block_r, num_warps=4)
    return out


# the GEMV's rows per program, and the programs it aims for per SM (split over the blocks)
GEMV_BLOCK_R = 8
GEMV_WAVES = 4
# Q4_K through ``_q4k_gemv_kernel`` (16-byte loads of whole blocks; the other kernel gathers
# every code byte on its own): (on, rows per program, warps). 32 rows over 8 warps: a thread
# holds one row's four code words and their sixteen x values, so the sm_90 build has no
# layout conversion (16 / 4 converts x through shared memory every block). Off until timed
# on a GPU (``quant_bench.py --gguf-q4k-vector``).
Q4K_VECTOR = (False, 32, 8)


def gemv(x: torch.Tensor, weight: torch.Tensor, kind: str, bias: torch.Tensor | None = None,
         gated: bool = False) -> torch.Tensor:
    """x [1, K] @ W^T (+ bias; ``gated``: silu(first half) * second half) for W's
    [rows, blocks, bytes] blocks of ``kind``: each block decoded where it is read, split over
    the blocks, the fp32 partial sums reduced with the epilogue in a second launch."""
    from pagedllm.quant import triton_wna16 as wna16
    code, elements, size, subs, length = _check(weight, kind)
    rows, blocks, _ = weight.shape
    if x.shape != (1, blocks * elements):
        raise ValueError(f"triton_gguf.gemv: x is {tuple(x.shape)}, the weight takes "
                         f"(1, {blocks * elements})")
    weight, x = weight.contiguous(), x.contiguous()
    vector, block_r, warps = Q4K_VECTOR if kind == "Q4_K" else (False, GEMV_BLOCK_R, 4)
    block_r = block_r if vector else GEMV_BLOCK_R
    tiles = triton.cdiv(rows, block_r)
    splits = max(1, min(blocks, triton.cdiv(GEMV_WAVES * wna16._sm_count(x.device), tiles)))
    per_split = triton.cdiv(blocks, splits)
    splits = triton.cdiv(blocks, per_split)
    part = torch.empty(splits, 1, rows, dtype=torch.float32, device=x.device)
    if vector:
        words = weight.view(torch.int32)  # [rows, blocks, 36]
        _q4k_gemv_kernel[(tiles, splits)](x, words, part, rows, blocks, per_split,
                                          words.stride(0), part.stride(0), BLOCK_R=block_r,
                                          num_warps=warps)
    else:
        _gguf_gemv_kernel[(tiles, splits)](x, weight, part, rows, blocks, per_split,
                                           weight.stride(0), part.stride(0), SIZE=size,
                                           S=subs, L=length, KIND=code, BLOCK_R=block_r,
                                           num_warps=4)
    return wna16._reduce(part, bias, gated, x.dtype)
