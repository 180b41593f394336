"""Triton kernels for bitsandbytes 4-bit weights (NF4 / FP4): the GEMV for one-row inputs
(batch-1 decode), a GEMM up to 16 rows (``GEMM_MAX_ROWS``) and a dequantize kernel for more
rows (prefill; then cuBLAS).

Layout (``bitsandbytes.BnB4bitLinearMethod``): ``weight`` uint8 [N, K/2], two codes a byte
over the row-major [N, K] weight, the first in the high nibble; ``absmax`` fp32 [N, K/64];
``code`` fp32 [16] (the NF4 or FP4 codebook). W[n, k] = code[q[n, k]] * absmax[n, k // 64].

The GEMV reads the bytes as int32 words ([N, K/8], value j of a word is k = 8 * word + j, in
byte j // 2, high nibble for even j) in [BLOCK_K / 8, BLOCK_N] tiles; each value's code is a
load from the 64-byte codebook (one L1 line), multiplied by x; a tile's sums are scaled by
each word's absmax. K is split over programs so that the SMs fill; the last program of a
column tile folds the splits with the epilogue (bias, gated SiLU: ``triton_wna16``'s fold).
The GEMM decodes a [BLOCK_N, 64] tile of W (one absmax per row) in registers and multiplies
it on the tensor cores as W x^T, split over K while the tiles are few.
The torch reference (``bitsandbytes.dequantize_4bit`` then matmul) is the oracle
(tests/kernels/test_nf4.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_attention import _split_counters
from pagedllm.layers import pdl
from pagedllm.quant import triton_wna16 as wna16
from pagedllm.quant.triton_wna16 import _store_split
from pagedllm.switches import switches

BLOCKSIZE = 64  # elements per absmax


@triton.jit
def _nf4_gemv_kernel(x_ptr, w_ptr, a_ptr, code_ptr, out_ptr, part_ptr, count_ptr, bias_ptr,
                     N, K, k_split, splits, half, stride_wn, stride_an, stride_os,
                     FOLD: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                     EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_PDL: tl.constexpr):
    # out[split, n] = sum over this split's K range of x[k] code[q[n, k]] absmax[n, k // 64]
    pdl.launch_dependents(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_split
    k_end = tl.minimum(k_start + k_split, K)
    col_ptrs = w_ptr + offs_n[None, :] * stride_wn
    a_cols = a_ptr + offs_n[None, :] * stride_an
    pdl.wait(USE_PDL)
    for k0 in range(k_start, k_start + k_split, BLOCK_K):
        word_rows = k0 // 8 + rows
        if EVEN:
            words = tl.load(col_ptrs + word_rows[:, None], eviction_policy="evict_first")
            scale = tl.load(a_cols + (word_rows // 8)[:, None])
        else:
            ok = (word_rows * 8 < k_end)[:, None] & n_ok[None, :]
            words = tl.load(col_ptrs + word_rows[:, None], mask=ok, other=0,
                            eviction_policy="evict_first")
            scale = tl.load(a_cols + (word_rows // 8)[:, None], mask=ok, other=0.0)
        qx = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            # value j: byte j // 2 of the little-endian word, the high nibble for even j
            nib = (words >> (8 * (j // 2) + 4 * (1 - j % 2))) & 15
            k = word_rows * 8 + j
            if EVEN:
                xj = tl.load(x_ptr + k).to(tl.float32)
            else:
                xj = tl.load(x_ptr + k, mask=k < k_end, other=0.0).to(tl.float32)
            qx += tl.load(code_ptr + nib) * xj[:, None]
        acc += qx * scale
    _store_split(tl.sum(acc, axis=0), out_ptr, part_ptr, count_ptr, bias_ptr, pid_n, pid_s,
                 offs_n, n_ok, N, splits, half, stride_os, FOLD, HAS_BIAS, GATED, BLOCK_N)


@triton.jit
def _nf4_dequant_kernel(w_ptr, a_ptr, code_ptr, out_ptr, N, K, stride_wn, stride_an,
                        stride_on, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[n, k] = code[q[n, k]] * absmax[n, k // 64], a [BLOCK_N, BLOCK_K] tile
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ok = (offs_n < N)[:, None] & (pairs * 2 < K)[None, :]
    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + pairs[None, :], mask=ok,
                     other=0).to(tl.int32)
    first = tl.load(code_ptr + (packed >> 4))
    second = tl.load(code_ptr + (packed & 15))
    values = tl.reshape(tl.join(first, second), (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ok_k = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    scale = tl.load(a_ptr + offs_n[:, None] * stride_an + (offs_k // 64)[None, :], mask=ok_k,
                    other=0.0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :],
             (values * scale).to(out_ptr.dtype.element_ty), mask=ok_k)


@triton.jit
def _nf4_gemm_kernel(x_ptr, w_ptr, a_ptr, code_ptr, out_ptr, M, N, K, k_split, stride_xm,
                     stride_wn, stride_an, stride_om, stride_os, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out[split, m, n] = x[m, split's K range] @ W^T: each [BLOCK_N, 64] tile of W (one
    # absmax per row) is decoded once in registers and multiplied on the tensor cores as
    # W x^T (the decoded tile is the dot's first operand, BLOCK_M x rows its N)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_s * k_split
    for k0 in range(k_start, tl.minimum(k_start + k_split, K), 64):  # K: 64 | K
        pairs = k0 // 2 + tl.arange(0, 32)
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + pairs[None, :],
                         mask=n_ok[:, None], other=0).to(tl.int32)
        first = tl.load(code_ptr + (packed >> 4))
        second = tl.load(code_ptr + (packed & 15))
        scale = tl.load(a_ptr + offs_n * stride_an + k0 // 64, mask=n_ok, other=0.0)
        w_t = tl.reshape(tl.join(first, second), (BLOCK_N, 64)) * scale[:, None]
        offs_k = k0 + tl.arange(0, 64)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None], other=0.0)
        if IEEE:
            acc_t += tl.dot(w_t, tl.trans(x), input_precision="ieee")
        else:
            acc_t += tl.dot(w_t.to(x.dtype), tl.trans(x))
    acc = tl.trans(acc_t)
    tl.store(out_ptr + pid_s * stride_os + offs_m[:, None].to(tl.int64) * stride_om
             + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & n_ok[None, :])


def dequantize(weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in ``dtype``, one launch."""
    n, k = weight.shape[0], weight.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 128))
    _nf4_dequant_kernel[grid](weight, absmax, code, out, n, k, weight.stride(0),
                              absmax.stride(0), out.stride(0), BLOCK_N=32, BLOCK_K=128,
                              num_warps=4)
    return out


# GEMV (BLOCK_N, BLOCK_K, num_warps), and the programs it aims for per SM (split-K)
GEMV_CONFIG = (64, 128, 4)
GEMV_WAVES = 8
def _gemv(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
          bias: torch.Tensor | None, gated: bool, config: tuple | None) -> torch.Tensor:
    """x [1, K] -> [1, N or N/2] with the epilogue."""
    block_n, block_k, warps, *rest = config or GEMV_CONFIG
    waves = rest[0] if rest else GEMV_WAVES
    n, k = weight.shape[0], weight.shape[1] * 2
    block_k = min(block_k, triton.next_power_of_2(k))
    n_tiles = triton.cdiv(n, block_n)
    splits, k_split = wna16._splits(n_tiles, k, block_k, waves * wna16._sm_count(x.device))
    fold = (switches().decode_fold and (splits > 1 or gated)
            and (not gated or (n // 2) % block_n == 0))
    if fold:
        out = torch.empty(1, n // 2 if gated else n, device=x.device, dtype=x.dtype)
        part = torch.empty(splits, n, device=x.device, dtype=torch.float32)
        counts = _split_counters(n_tiles, x.device)
    else:
        out = part = counts = torch.empty(splits, n, device=x.device,
                                          dtype=x.dtype if splits == 1 else torch.float32)
    words = weight.view(torch.int32)
    _nf4_gemv_kernel[(n_tiles, splits)](
        x, words, absmax, code, out, part, counts, bias if bias is not None else part, n, k,
        k_split, splits, n // 2, words.stride(0), absmax.stride(0), part.stride(0),
        FOLD=fold, HAS_BIAS=bias is not None, GATED=gated,
        EVEN=n % block_n == 0 and k % k_split == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, **pdl.options(x))
    if fold:
        return out
    if splits > 1:
        return wna16._reduce(out.unsqueeze(1), bias, gated, x.dtype)
    return wna16._epilogue(out, bias, gated)


# the GEMM's (BLOCK_M, BLOCK_N, num_warps, num_stages, split-K programs per SM) up to
# GEMM_MAX_ROWS rows; more rows: the weight dequantized by one launch, then cuBLAS. H100
# sweep at 16 rows (quant_bench --tune-nf4, s7c): (16, 128, 4, 1, 2) was best or within 1%
# on the four Llama-3-8B projections, 1.8-2.2x faster than (16, 64, 4, 3, 2) (software
# pipelining puts the codebook gathers through shared memory); at 64 rows the untuned
# GEMM lost to dequantize + cuBLAS, so it serves up to 16 rows
GEMM_CONFIG = (16, 128, 4, 1, 2)
GEMM_MAX_ROWS = 16


def _gemm(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
          bias: torch.Tensor | None, gated: bool, config: tuple | None) -> torch.Tensor:
    """x [M, K] (M <= GEMM_MAX_ROWS) -> [M, N or N/2] with the epilogue."""
    block_m, block_n, warps, stages, waves = config or GEMM_CONFIG
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1] * 2
    block_m = max(16, min(triton.next_power_of_2(m), block_m))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits, k_split = wna16._splits(tiles, k, BLOCKSIZE, waves * wna16._sm_count(x.device), m)
    out = torch.empty(splits, m, n, device=x.device,
                      dtype=x.dtype if splits == 1 else torch.float32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _nf4_gemm_kernel[grid](x, weight, absmax, code, out, m, n, k, k_split, x.stride(0),
                           weight.stride(0), absmax.stride(0), out.stride(1), out.stride(0),
                           IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                           num_warps=warps, num_stages=stages)
    if splits > 1:
        return wna16._reduce(out, bias, gated, x.dtype)
    return wna16._epilogue(out[0], bias, gated)


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor,
               code: torch.Tensor, *, bias: torch.Tensor | None = None, gated: bool = False,
               gemv: bool | None = None, config: tuple | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype (``gated``: then silu(first half)
    * second half). One row: the GEMV (``gemv=False`` takes the GEMM instead); up to
    ``GEMM_MAX_ROWS`` rows the GEMM; more: the weight dequantized by one launch, then cuBLAS.
    ``config``: the GEMV's or the GEMM's tile config (tuning)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
        x2 = x2.contiguous()
    k = weight.shape[1] * 2
    if x2.shape[1] != k or k % BLOCKSIZE:
        raise ValueError(f"nf4_matmul: x has {x2.shape[1]} features, the weight {k} (a "
                         f"multiple of {BLOCKSIZE})")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    rows = x2.shape[0]
    if rows == 0:
        return x.new_empty(*shape[:-1], n_out)
    if rows == 1 and gemv is not False:
        out = _gemv(x2, weight, absmax, code, bias, gated, config)
    elif rows <= GEMM_MAX_ROWS:
        out = _gemm(x2, weight, absmax, code, bias, gated, config)
    else:
        out = torch.matmul(x2, dequantize(weight, absmax, code, x2.dtype).t())
        out = wna16._epilogue(out, bias, gated)
    return out.reshape(*shape[:-1], n_out)
