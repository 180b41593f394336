"""Triton W4A16 matmul with the dequantization fused: one kernel for the GPTQ and AWQ 4-bit
layouts, x [M, K] (fp16 / bf16 / fp32) times the int4 weight, fp32 accumulation.

Each program computes a [BLOCK_M, BLOCK_N] tile of the output. Per K step it loads the packed
words of its [BLOCK_K, BLOCK_N] weight tile, shifts out the 4-bit codes (GPTQ: packed along K,
code k%8 of word k//8; AWQ: packed along N in the order 0 2 4 6 1 3 5 7, so column n sits in
slot (n%2)*4 + (n%8)//2), looks up each row's group (GPTQ ``g_idx``, AWQ k // group_size),
subtracts the zero (packed along N in both layouts, plus ``zero_offset``: 1 for GPTQ v1) and
multiplies by the group scale, then feeds the tile to ``tl.dot``. Batch-1 decode runs the same
kernel with M padded to 16 rows (``tl.dot``'s minimum): correct, not yet a tuned GEMV.
The torch references in ``packing.py`` are the oracle (tests/kernels/test_w4a16.py). Not yet
wired into the GPTQ / AWQ ``apply``: that waits for the test to have run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _code(words, shift):
    return (words >> shift) & 0xF


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, M, N, K, group_size,
                  zero_offset, stride_xm, stride_qw, stride_qz, stride_s, stride_om,
                  AWQ: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if AWQ:  # AWQ's interleaved slot of column n; GPTQ zeros are in natural order
        n_slot = (offs_n % 2) * 4 + (offs_n % 8) // 2
    else:
        n_slot = offs_n % 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        tile_ok = k_ok[:, None] & n_ok[None, :]
        if AWQ:
            words = tl.load(qw_ptr + offs_k[:, None] * stride_qw + (offs_n // 8)[None, :],
                            mask=tile_ok, other=0)
            q = _code(words, (n_slot * 4)[None, :])
            g = offs_k // group_size
        else:
            words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qw + offs_n[None, :],
                            mask=tile_ok, other=0)
            q = _code(words, ((offs_k % 8) * 4)[:, None])
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        zwords = tl.load(qz_ptr + g[:, None] * stride_qz + (offs_n // 8)[None, :],
                         mask=tile_ok, other=0)
        z = _code(zwords, (n_slot * 4)[None, :]) + zero_offset
        s = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=tile_ok, other=0.0)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor, *, awq: bool, g_idx: torch.Tensor | None = None,
                 group_size: int = 0, zero_offset: int = 0) -> torch.Tensor:
    """x [..., K] @ W [K, N] with W the dequantized int4 weight (GPTQ: ``g_idx`` and
    ``zero_offset``; AWQ: ``group_size``). Returns [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = scales.shape[1]
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, 64))
    g = g_idx if g_idx is not None else qzeros  # unused by the AWQ branch
    _w4a16_kernel[grid](x2, qweight, qzeros, scales, g, out, M, N, K, max(group_size, 1),
                        zero_offset, x2.stride(0), qweight.stride(0), qzeros.stride(0),
                        scales.stride(0), out.stride(0), AWQ=awq,
                        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=64,
                        BLOCK_K=32, num_warps=4)
    return out.reshape(*shape[:-1], N)
