"""Fused Triton kernels for the small per-layer ops on CUDA, each beside its torch reference.

A batch-1 decode step of the Llama-3-8B shape spent ~2.4 ms of its ~8.5 ms in ~25 small
elementwise kernels per layer (dtype casts, pow/mean/rsqrt, rotate-half cat/neg, silu, mul;
``benchmarks/profile_decode.py``). These kernels do each op in one pass:
- ``rms_norm``: optional residual add (the sum is returned as the new residual), then
  x * rsqrt(mean(x^2) + eps) * (weight + offset), in fp32, one program per row (or per
  head of a [tokens, heads, dim] view: Qwen3's q/k norm);
- ``rotary_neox``: neox-style rotation of the first ``rotary_dim`` dims of every q and k head,
  in place, cos/sin read from the layer's tables at each token's position;
- ``silu_and_mul``: silu(x[:, :d]) * x[:, d:].
The layers call them only for CUDA tensors (``pagedllm.layers.fused``); CPU keeps the torch
code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers import pdl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, sum_ptr, out_ptr, w_ptr, n_cols, heads, stride_x,
                     stride_xh, stride_r, stride_s, stride_o, eps, offset,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # row = token * heads + head: x rows may be heads of a strided [tokens, heads, dim] view
    pdl.launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    pdl.wait(USE_PDL)  # x and the residual come from the kernels before
    x = tl.load(x_ptr + (row // heads) * stride_x + (row % heads) * stride_xh + cols, mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)  # the new residual
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    tl.store(out_ptr + row * stride_o + cols, (h * inv * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             residual: torch.Tensor | None = None):
    """x [rows, hidden] -> normalised [rows, hidden]. With ``residual``, the sum x + residual
    is normalised and returned too: (normalised, sum), neither input is written. x may also
    be [tokens, heads, head_dim] with any token and head strides (Qwen3's q/k norm on views
    of the fused qkv output; no residual then): the result is contiguous. Matches
    ``RMSNorm``'s torch path."""
    if x.dim() not in (2, 3) or x.stride(-1) != 1 or (x.dim() == 3 and residual is not None):
        raise ValueError(f"x must be [rows, hidden] or, without residual, [tokens, heads, dim] "
                         f"with a contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    heads, stride_h = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    rows, n_cols = x.shape[0] * heads, x.shape[-1]
    if rows:
        res = residual if residual is not None else x
        _rms_norm_kernel[(rows,)](
            x, res, total, out, weight, n_cols, heads, x.stride(0), stride_h, res.stride(0),
            total.stride(0), n_cols, eps, offset, HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(n_cols), num_warps=8 if n_cols >= 4096 else 4,
            **pdl.options(x))
    return out if residual is None else (out, total)


def rms_norm_ref(x, weight, eps, offset=0.0, residual=None):
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (h * (weight.float() + offset)).to(x.dtype)
    return out if residual is None else (out, x)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, num_heads, stride_t, stride_h, stride_cos,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   USE_PDL: tl.constexpr):
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    mask = (heads < num_heads)[:, None] & d_mask[None, :]
    p1 = x_ptr + tok * stride_t + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(p1 + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


def rotary_neox(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, rotary_dim: int) -> None:
    """In place: q [tokens, q_heads, head_dim], k [tokens, k_heads, head_dim] (last dim
    contiguous); cos/sin [max_position, rotary_dim] full-width neox tables (both halves
    equal), fp32. Rotates dims [0, rotary_dim) of every head; the rest is untouched."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dim")
    if q.shape[0] == 0:
        return
    half = rotary_dim // 2
    for x in (q, k):
        block_h = min(triton.next_power_of_2(x.shape[1]), 16)
        _rotary_kernel[(x.shape[0], triton.cdiv(x.shape[1], block_h))](
            x, positions, cos, sin, x.shape[1], x.stride(0), x.stride(1), cos.stride(0),
            HALF=half, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4, **pdl.options(q))


def rotary_neox_ref(positions, q, k, cos, sin, rotary_dim):
    """In place, fp32 math: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the rotated dims."""
    half = rotary_dim // 2
    c, s_ = cos[positions, :half][:, None, :], sin[positions, :half][:, None, :]
    for x in (q, k):
        a, b = x[..., :half].float(), x[..., half:rotary_dim].float()
        x[..., :half], x[..., half:rotary_dim] = (a * c - b * s_).to(x.dtype), \
            (b * c + a * s_).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_o, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2d] -> silu(x[:, :d]) * x[:, d:] [rows, d]."""
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] % 2:
        raise ValueError(f"x must be [rows, 2d] with a contiguous last dim, got {tuple(x.shape)}")
    d = x.shape[1] // 2
    out = torch.empty(x.shape[0], d, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(d, block))](
        x, out, d, x.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl.options(x))
    return out


def silu_and_mul_ref(x):
    d = x.shape[-1] // 2
    return (torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, up_offset,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                 PREFETCH: tl.constexpr, USE_PDL: tl.constexpr):
    # one row of x times BLOCK_N rows of W (and, GATED, the BLOCK_N rows up_offset further).
    # The weight tile is [BLOCK_N, BLOCK_K // VEC, VEC]: a thread's 16-byte vector is the last
    # axis, summed in registers every chunk, so the accumulator holds one fp32 a vector, not
    # one an element, and large chunks keep the occupancy. PREFETCH: the next chunk's loads
    # are issued before this chunk's products (two chunks in flight a program). The first
    # chunk is loaded before waiting for x (the kernel before writes it)
    pdl.launch_dependents(USE_PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = (rows < N)[:, None, None]
    cols = (tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None]
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn
    mask = row_mask if EVEN_K else row_mask & (cols < K)
    w = tl.load(w_rows + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    u = w
    if GATED:
        u = tl.load(w_rows + up_offset + cols, mask=mask, other=0.0,
                    eviction_policy="evict_first")
    pdl.wait(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        nk = k + BLOCK_K + cols
        nmask = row_mask & (nk < K)
        if PREFETCH:
            w_next = tl.load(w_rows + nk, mask=nmask, other=0.0, eviction_policy="evict_first")
            u_next = w_next
            if GATED:
                u_next = tl.load(w_rows + up_offset + nk, mask=nmask, other=0.0,
                                 eviction_policy="evict_first")
        kk = k + cols
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x, 2)
        if GATED:
            acc_up += tl.sum(u.to(tl.float32) * x, 2)
        if PREFETCH:
            w = w_next
            u = u_next
        else:
            w = tl.load(w_rows + nk, mask=nmask, other=0.0, eviction_policy="evict_first")
            if GATED:
                u = tl.load(w_rows + up_offset + nk, mask=nmask, other=0.0,
                            eviction_policy="evict_first")
    out = tl.sum(acc, 1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = rows < N
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=out_mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(acc_up, 1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rows, mask=out_mask, other=0.0).to(tl.float32)
        # round like the unfused path: projection outputs in x's dtype, then silu(g) * u
        g = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        out = g / (1.0 + tl.exp(-g)) * up
    # rounded to x's dtype like the unfused matmul, then stored as out's (fp32 logits)
    tl.store(out_ptr + rows, out.to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty),
             mask=out_mask)


# (block_n, block_k, num_warps, prefetch) by the weight's [N, K], from the H200 sweep of
# benchmarks/gpu_gemv.py (Llama-3-8B / Mistral-7B shapes) and the H100 sweep of the
# Qwen3-30B-A3B attention, router and LM head (2026-12-07: 1.20x, 1.88x, 3.58x and 1.05x
# cuBLAS). The engine sends only these shapes to the GEMV (``fused.use_gemv``): with untuned
# configs it lost to cuBLAS
GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (6144, 4096): (1, 2048, 8, 1), (4096, 4096): (2, 1024, 2, 1), (28672, 4096): (1, 4096, 4, 0),
    (4096, 14336): (1, 2048, 4, 0), (128256, 4096): (1, 1024, 4, 1),
    (5120, 2048): (2, 1024, 4, 0), (2048, 4096): (1, 2048, 4, 0), (128, 2048): (1, 2048, 8, 0),
    (151936, 2048): (1, 1024, 2, 0)}
GEMV_DEFAULT = (2, 1024, 4, 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         gated: bool = False, config: tuple[int, int, int, int] | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T (+ bias) -> [1, N] for one-token steps (batch-1 decode),
    where cuBLAS picks split-K kernels plus a reduction launch for the narrow matrices.
    ``gated``: weight is a fused [gate; up] projection of 2d rows and the result is
    silu(x @ gate^T) * (x @ up^T) [1, d] in the same pass (``silu_and_mul`` fused).
    ``out_dtype`` (fp32 for logits): the result rounded to x's dtype, stored as out_dtype,
    which saves the LM head's separate ``.float()`` kernel.

    1. a program owns BLOCK_N output rows (and their up rows when gated) and walks K in
       BLOCK_K chunks; each thread loads 16-byte vectors and sums their fp32 products in
       registers, one fp32 a vector carried (so large chunks, many bytes in flight, keep the
       occupancy); with ``prefetch`` the next chunk is loaded before this one is multiplied;
    2. one reduction over the chunk axis at the end, bias, the SiLU gate, one store.
    ``config``: (block_n, block_k, num_warps, prefetch), tuned per shape (``GEMV_CONFIGS``).
    (A [BLOCK_N, BLOCK_K] fp32 accumulator, the first version, ran 1.02-1.10x slower: its
    registers capped the chunk at 512 columns; docs/benchmarks.md, seventh part.)
    (Folding the residual add and RMSNorm into this pass was measured too: the extra loads
    in every chunk slowed each GEMV more than the two norm launches cost; docs/benchmarks.md.)
    """
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1] or \
            weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv takes x [1, K] and a row-major weight [N, K], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)} strides "
                         f"{weight.stride()}")
    n_rows, k = weight.shape
    if gated and n_rows % 2:
        raise ValueError(f"a gated weight has 2d rows, got {n_rows}")
    n = n_rows // 2 if gated else n_rows
    out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    block_n, block_k, warps, prefetch = config or GEMV_CONFIGS.get((n_rows, k), GEMV_DEFAULT)
    block_k = min(block_k, triton.next_power_of_2(k))
    vec = min(16 // weight.element_size(), block_k)  # one 16-byte load a thread
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        n * weight.stride(0), HAS_BIAS=bias is not None, GATED=gated, EVEN_K=k % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec, PREFETCH=bool(prefetch), num_warps=warps,
        **pdl.options(x))
    return out


def gemv_ref(x, weight, bias=None, gated=False, out_dtype=None):
    out = torch.nn.functional.linear(x.float(), weight.float(),
                                     bias.float() if bias is not None else None).to(x.dtype)
    out = silu_and_mul_ref(out) if gated else out
    return out.to(out_dtype or x.dtype)
