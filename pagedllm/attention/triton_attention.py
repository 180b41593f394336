"""Paged attention on NVIDIA GPUs in Triton: KV-cache write, decode (split-KV) and varlen prefill.

Layout shared with ``torch_ref`` (the oracle): per layer ``kv_cache`` is
[2, num_blocks * block_size, num_kv_heads, head_dim] (K then V, last dim contiguous); the slot of
a token is ``block_id * block_size + offset``. Query head ``h`` reads KV head ``h // group``
(``group = num_heads // num_kv_heads``), as ``repeat_interleave`` does in the reference.

GQA packing: an attention program owns one KV head and the ``group`` query heads that share it,
so every K/V tile loaded from the cache feeds all of them. Its query tile has ``BLOCK_M`` rows;
row ``r`` is query token ``r // group`` and head ``kv_head * group + r % group`` (decode: one
token, rows = heads, padded to 16 for ``tl.dot``).

Scores are kept in log2 units (scaled by log2(e)) so the online softmax uses ``exp2``; the
running max, sum and accumulator are fp32 whatever the cache dtype.

Everything here is CUDA-graph safe: no host syncs, grids depend only on shapes and Python ints,
loop bounds come from ``seq_lens`` / ``query_start_loc`` read inside the kernels.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagedllm.attention.backend import AttentionMetadata, PrefillSeq
from pagedllm.attention.kv_quant import is_fp8
from pagedllm.attention.torch_ref import paged_attention as _paged_attention_ref
from pagedllm.attention.torch_ref import write_kv_cache as _write_kv_cache_ref
from pagedllm.layers import pdl
from pagedllm.switches import switches

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# KV-cache write
# ---------------------------------------------------------------------------------------------

@triton.jit
def _write_kv_cache_kernel(
    kv_ptr,  # [2, num_slots, num_kv_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64 (or int32); < 0 = skip
    num_kv_heads,
    stride_kt, stride_kh,  # k strides (token, head); head_dim stride is 1
    stride_vt, stride_vh,
    stride_kv, stride_slot, stride_kvh,  # kv_cache strides (K/V, slot, head)
    inv_k_scale, inv_v_scale,  # fp8 cache: stored values are k / k_scale, v / v_scale
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,  # 0: not an fp8 cache; else the format's largest finite value
    USE_PDL: tl.constexpr,  # pagedllm/layers/pdl.py
):
    pdl.launch_dependents(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)  # written before the step's kernels
    pdl.wait(USE_PDL)
    mask = (heads < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :] & (slot >= 0)
    k = tl.load(k_ptr + tok * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = kv_ptr + slot * stride_slot + heads[:, None] * stride_kvh + offs_d[None, :]
    if FP8_MAX > 0:
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX, FP8_MAX)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Scatter this step's K/V into the paged cache; tokens whose slot is < 0 are skipped.
    An fp8 cache stores k / k_scale and v / v_scale, saturated to the format's range.

    kv_cache [2, num_slots, num_kv_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim];
    slot_mapping [num_tokens] int64.

    1. one program per (token, tile of BLOCK_H heads) loads the token's slot;
    2. loads that K and V tile (masked off when the slot is negative: CUDA-graph padding);
    3. casts to the cache dtype and stores both at ``slot``.
    """
    _check_cache(kv_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or kv_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and kv_cache "
                         f"{tuple(kv_cache.shape)} disagree on [num_kv_heads, head_dim]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_cache_kernel[grid](
        kv_cache, k, v, slot_mapping, num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, FP8_MAX=_fp8_max(kv_cache.dtype),
        num_warps=4, **pdl.options(k))


def write_kv_cache_ref(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> None:
    """Reference: ``torch_ref.write_kv_cache`` on the tokens whose slot is >= 0 (syncs)."""
    keep = slot_mapping >= 0
    _write_kv_cache_ref(kv_cache, k[keep], v[keep], slot_mapping[keep], k_scale, v_scale)


@triton.jit
def _rope_part(ptr, offs, mask, pos, cos_ptr, sin_ptr, stride_cos, d, d_mask, norm_w_ptr, eps,
               head_dim, HALF: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
               QK_NORM: tl.constexpr):
    """Heads at ``ptr + offs`` [BLOCK_H, 1]: (per-head RMSNorm), neox rotation of the first
    2 * HALF dims -> (x1, x2, rest) in the input dtype, rounded as the unfused ops round."""
    x1 = tl.load(ptr + offs + d[None, :], mask=mask & d_mask[None, :], other=0.0)
    x2 = tl.load(ptr + offs + HALF + d[None, :], mask=mask & d_mask[None, :], other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    r = tl.zeros([1, BLOCK_REST], tl.float32)
    r_offs = tl.arange(0, BLOCK_REST)
    r_mask = mask & (r_offs < REST)[None, :]
    if REST > 0:
        r = tl.load(ptr + offs + 2 * HALF + r_offs[None, :], mask=r_mask, other=0.0).to(tl.float32)
    if QK_NORM:  # q_norm / k_norm over each whole head (offset-0 RMSNorm), then rotary
        ss = tl.sum(a * a, 1) + tl.sum(b * b, 1)
        if REST > 0:
            ss += tl.sum(r * r, 1)
        inv = (1.0 / tl.sqrt(ss / head_dim + eps))[:, None]
        w1 = tl.load(norm_w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_w_ptr + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        a = (a * inv * w1).to(x1.dtype).to(tl.float32)
        b = (b * inv * w2).to(x1.dtype).to(tl.float32)
        if REST > 0:
            wr = tl.load(norm_w_ptr + 2 * HALF + r_offs, mask=r_offs < REST,
                         other=0.0).to(tl.float32)[None, :]
            r = (r * inv * wr).to(x1.dtype).to(tl.float32)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    return ((a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype),
            r.to(x1.dtype), r_offs, r_mask)


@triton.jit
def _rope_rows(row_ptrs, row_mask, offs_d, pos, cos_ptr, sin_ptr, stride_cos, norm_w_ptr, eps,
               head_dim, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """Heads at ``row_ptrs`` [R, 1] as whole [R, BLOCK_D] tiles: (per-head RMSNorm), neox
    rotation of the first 2 * HALF dims, in the input dtype, rounded where ``_rope_part``
    rounds. Each dim's partner (d + HALF or d - HALF) is loaded as a second tile, so the
    result keeps the head's layout (the paged decode kernel multiplies it as it is)."""
    d = offs_d[None, :]
    first = d < HALF
    in_rot = d < 2 * HALF
    partner = tl.where(first, d + HALF, d - HALF)
    mask = row_mask & (d < head_dim)
    raw = tl.load(row_ptrs + d, mask=mask, other=0.0)
    x = raw.to(tl.float32)
    p = tl.load(row_ptrs + partner, mask=mask & in_rot, other=0.0).to(tl.float32)
    if QK_NORM:
        inv = (1.0 / tl.sqrt(tl.sum(x * x, 1) / head_dim + eps))[:, None]
        w = tl.load(norm_w_ptr + d, mask=d < head_dim, other=0.0).to(tl.float32)
        w_p = tl.load(norm_w_ptr + partner, mask=in_rot, other=0.0).to(tl.float32)
        x = (x * inv * w).to(raw.dtype).to(tl.float32)
        p = (p * inv * w_p).to(raw.dtype).to(tl.float32)
    c_idx = tl.where(first, d, d - HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + c_idx, mask=in_rot, other=1.0)
    sin = tl.load(sin_ptr + pos * stride_cos + c_idx, mask=in_rot, other=0.0)
    rotated = tl.where(first, x * cos - p * sin, x * cos + p * sin)
    return tl.where(in_rot, rotated, x).to(raw.dtype)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]: rotated in place
    k_ptr, v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    kv_ptr,  # [2, num_slots, num_kv_heads, head_dim]
    slot_mapping_ptr, pos_ptr,  # [num_tokens]
    cos_ptr, sin_ptr,  # [max_position, >= 2 * HALF] fp32 neox tables
    q_norm_ptr, k_norm_ptr,  # [head_dim] RMSNorm weights (QK_NORM)
    num_heads, num_kv_heads, head_dim,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv, stride_slot, stride_kvh, stride_cos,
    eps, inv_k_scale, inv_v_scale,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, REST: tl.constexpr,
    BLOCK_REST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.launch_dependents(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    q_tiles = tl.cdiv(num_heads, BLOCK_H)
    pos = tl.load(pos_ptr + tok).to(tl.int64)  # written before the step's kernels
    pdl.wait(USE_PDL)  # q, k, v come from the projection before
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    if tile < q_tiles:  # query heads: rotate in place
        heads = tile * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None]
        offs = tok * stride_qt + heads[:, None] * stride_qh
        x1, x2, r, r_offs, r_mask = _rope_part(q_ptr, offs, mask, pos, cos_ptr, sin_ptr,
                                               stride_cos, d, d_mask, q_norm_ptr, eps,
                                               head_dim, HALF, REST, BLOCK_REST, QK_NORM)
        tl.store(q_ptr + offs + d[None, :], x1, mask=mask & d_mask[None, :])
        tl.store(q_ptr + offs + HALF + d[None, :], x2, mask=mask & d_mask[None, :])
        if QK_NORM and REST > 0:
            tl.store(q_ptr + offs + 2 * HALF + r_offs[None, :], r, mask=r_mask)
    else:  # key heads: rotate, then store K and V at the token's slot (slot < 0: skip)
        heads = (tile - q_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        mask = (heads < num_kv_heads)[:, None] & (slot >= 0)
        offs = tok * stride_kt + heads[:, None] * stride_kh
        x1, x2, r, r_offs, r_mask = _rope_part(k_ptr, offs, mask, pos, cos_ptr, sin_ptr,
                                               stride_cos, d, d_mask, k_norm_ptr, eps,
                                               head_dim, HALF, REST, BLOCK_REST, QK_NORM)
        dst = kv_ptr + slot * stride_slot + heads[:, None] * stride_kvh
        offs_d = tl.arange(0, BLOCK_D)
        vd_mask = mask & (offs_d < head_dim)[None, :]
        v = tl.load(v_ptr + tok * stride_vt + heads[:, None] * stride_vh + offs_d[None, :],
                    mask=vd_mask, other=0.0)
        out_ty = kv_ptr.dtype.element_ty
        k1, k2, kr, vs = x1.to(out_ty), x2.to(out_ty), r.to(out_ty), v.to(out_ty)
        if FP8_MAX > 0:
            k1 = tl.clamp(x1.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX).to(out_ty)
            k2 = tl.clamp(x2.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX).to(out_ty)
            kr = tl.clamp(r.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX).to(out_ty)
            vs = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX, FP8_MAX).to(out_ty)
        tl.store(dst + d[None, :], k1, mask=mask & d_mask[None, :])
        tl.store(dst + HALF + d[None, :], k2, mask=mask & d_mask[None, :])
        if REST > 0:
            tl.store(dst + 2 * HALF + r_offs[None, :], kr, mask=r_mask)
        tl.store(dst + stride_kv + offs_d[None, :], vs, mask=vd_mask)


def rope_write_kv_cache(kv_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                        q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                        eps: float = 1e-6, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Rotary embedding and the KV-cache write in one launch (one per layer instead of three).

    q [num_tokens, num_heads, head_dim] is rotated in place; k [num_tokens, num_kv_heads,
    head_dim] is rotated on its way into the cache and v stored as is (``write_kv_cache``'s
    rules: slot < 0 skips, an fp8 cache stores k / k_scale and v / v_scale); k itself is not
    written. Neox rotation of the first ``rotary_dim`` dims with cos/sin [max_position,
    rotary_dim] fp32 tables (both halves equal), the rest of each head untouched. With
    ``q_norm`` / ``k_norm`` (Qwen3) each head is RMS-normalised first (weights [head_dim],
    ``eps``), rounded to q's dtype as ``RMSNorm`` rounds.

    1. grid (num_tokens, query-head tiles + key-head tiles), BLOCK_H heads a program;
    2. a program loads its heads' two rotated halves (and the rest), normalises, rotates in
       fp32 with the token's cos/sin row;
    3. query tiles store back into q; key tiles store K and V at the token's slot.
    """
    _check_cache(kv_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if v.shape != k.shape or kv_cache.shape[2:] != k.shape[1:] or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and "
                         f"kv_cache {tuple(kv_cache.shape)} disagree on heads / head_dim")
    if slot_mapping.shape != (num_tokens,) or positions.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} and positions "
                         f"{tuple(positions.shape)} must be [{num_tokens}]")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, {head_dim}]")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous last dim (it is rotated in place)")
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(max(num_heads, num_kv_heads)), max(1, 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    norms = (q_norm, k_norm) if q_norm is not None else (q, q)  # placeholders when unused
    _rope_write_kv_kernel[grid](
        q, k, v, kv_cache, slot_mapping, positions, cos, sin, norms[0], norms[1],
        num_heads, num_kv_heads, head_dim, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        cos.stride(0), eps, 1.0 / k_scale, 1.0 / v_scale,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), REST=rest,
        BLOCK_REST=triton.next_power_of_2(max(rest, 1)), BLOCK_H=block_h, BLOCK_D=block_d,
        QK_NORM=q_norm is not None, FP8_MAX=_fp8_max(kv_cache.dtype), num_warps=4,
        **pdl.options(q))


def rope_write_kv_cache_ref(kv_cache, q, k, v, slot_mapping, positions, cos, sin, rotary_dim,
                            q_norm=None, k_norm=None, eps=1e-6, k_scale=1.0, v_scale=1.0):
    """Reference: per-head RMSNorm, ``rotary_neox_ref`` on q and a copy of k, then
    ``write_kv_cache_ref`` (same rounding points as the fused kernel)."""
    from pagedllm.layers.triton_ops import rms_norm_ref, rotary_neox_ref
    k = k.clone()
    if q_norm is not None:
        q.copy_(rms_norm_ref(q, q_norm, eps))
        k = rms_norm_ref(k, k_norm, eps)
    rotary_neox_ref(positions, q, k, cos, sin, rotary_dim)
    write_kv_cache_ref(kv_cache, k, v, slot_mapping, k_scale, v_scale)


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if is_fp8(dtype) else 0.0


# ---------------------------------------------------------------------------------------------
# Shared pieces of the attention kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _split_tiles(tile_lo, tile_hi, split, NUM_SPLITS: tl.constexpr, MIN_TILES: tl.constexpr):
    """[t_start, t_end): split ``split``'s equal share of the key tiles [tile_lo, tile_hi),
    MIN_TILES at least (splits past the end get an empty range)."""
    tiles_per_split = tl.maximum(tl.cdiv(tile_hi - tile_lo, NUM_SPLITS), MIN_TILES)
    t_start = tile_lo + split * tiles_per_split
    return t_start, tl.minimum(t_start + tiles_per_split, tile_hi)


@triton.jit
def _scores(q, k, qk_scale, cap_scale,
            USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q [M, D] x k^T [D, N] -> fp32 scores [M, N] in log2 units, soft-capped when asked."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if USE_SOFT_CAP:
        # s = scale * qk / cap here; cap * tanh(s) * log2(e), tanh written with exp so the
        # interpreter and every backend have it: sign(s) (1 - e) / (1 + e), e = exp(-2|s|) <= 1.
        e = tl.exp(-2.0 * tl.abs(s))
        t = (1.0 - e) / (1.0 + e)
        s = cap_scale * tl.where(s < 0.0, -t, t)
    return s


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with scores s [M, N] (-inf = masked) and values v [N, D].

    A row whose keys so far are all masked keeps m = -inf, l = 0, acc = 0 (no NaN).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])  # [M, N]
    alpha = tl.math.exp2(m_i - m_use)  # [M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_kv_tile(kv_ptr, block_table_row_ptr, k_pos, k_valid, kv_head, offs_d, d_mask,
                  stride_kv, stride_slot, stride_kvh, BLOCK_SIZE: tl.constexpr):
    """Gather K and V rows [N, D] of key positions k_pos [N] through the block table."""
    block_ids = tl.load(block_table_row_ptr + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
    slots = block_ids.to(tl.int64) * BLOCK_SIZE + k_pos % BLOCK_SIZE  # [N]
    ptrs = kv_ptr + kv_head * stride_kvh + slots[:, None] * stride_slot + offs_d[None, :]
    mask = k_valid[:, None] & d_mask[None, :]  # [N, D]
    k = tl.load(ptrs, mask=mask, other=0.0)
    v = tl.load(ptrs + stride_kv, mask=mask, other=0.0)
    return k, v


# ---------------------------------------------------------------------------------------------
# Decode: one query token per sequence, split-KV
# ---------------------------------------------------------------------------------------------

# The decode algorithm (``paged_attention_decode``):
# 1. grid (num_seqs, num_kv_heads, num_splits): a program takes one sequence, one KV head
#    and all ``group`` query heads on it (rows of a [16+, head_dim] query tile);
# 2. the visible keys [max(0, seq_len - window), seq_len) are cut into BLOCK_N-key tiles, and
#    split ``s`` takes the s-th equal share of those tiles (no work past seq_len);
# 3. per tile: gather K/V rows through the block table (slot = block_id * block_size + off),
#    scores = tl.dot(q, K^T) * scale (soft-capped), masked, online softmax in fp32 (exp2),
#    acc += tl.dot(p, V);
# 4. one split: write acc / l. Several: write (m, l, acc) partials, which are rescaled by
#    exp2(m_s - max m) and combined into sum(acc) / sum(l) (``_combine_splits``) either
#    by the last split program of each (sequence, KV head) to finish (``fold_reduce``: a
#    per-(sequence, KV head) counter, incremented by every split after its partials are
#    stored, tells it; it resets the counter) or by a second kernel per (sequence, head).
#    Folding saves that launch (batch-1 decode: one per layer); it is used when the last
#    program's [group, splits, head_dim] partials fit its registers
#    (``PAGEDLLM_DECODE_FOLD=0``: never, for A/B runs).
# Arguments that change from step to step are not specialized on (Triton compiles a variant for
# each value that is 1 or a multiple of 16): the first mixed batches of a fresh server each
# compiled new decode / prefill variants mid-run (0.8-0.9 s steps where 0.1 s was usual).
@triton.jit(do_not_specialize=["stride_bt", "num_seqs", "sliding_window"])
def _paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim] (NUM_SPLITS == 1)
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, head_dim] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32: running max (log2), sum
    q_ptr,  # [num_seqs, num_heads, head_dim]
    kv_ptr,  # [2, num_slots, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    count_ptr,  # [num_seqs * num_kv_heads] int32 zeros: splits done (FOLD)
    k_new_ptr, v_new_ptr,  # ROPE: this step's k, v [num_seqs, num_kv_heads, head_dim]
    slot_ptr, pos_ptr,  # ROPE: [num_seqs] the new token's cache slot and position
    cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,  # ROPE: neox tables, QK_NORM weights
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_kv, stride_slot, stride_kvh, stride_bt,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    num_seqs, num_heads, num_kv_heads,
    qk_scale, cap_scale, sliding_window, v_scale, eps, inv_k_scale, inv_v_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FOLD: tl.constexpr, GROUP_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
    FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.launch_dependents(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)  # written before the step's kernels
    pdl.wait(USE_PDL)  # q and this step's K/V come from the kernels before

    rows = tl.arange(0, BLOCK_H)  # [BLOCK_H] query heads of this group
    heads = kv_head * GROUP + rows
    row_valid = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_rows = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
    if ROPE:  # q as it comes from the projection: normalised and rotated here
        pos = tl.load(pos_ptr + seq).to(tl.int64)
        q = _rope_rows(q_rows, row_valid[:, None], offs_d, pos, cos_ptr, sin_ptr, stride_cos,
                       q_norm_ptr, eps, HEAD_DIM, HALF, QK_NORM)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & d_mask[None, :],
                    other=0.0)  # [BLOCK_H, BLOCK_D]

    # Visible keys: [lo, seq_len); this split takes an equal share of the tiles covering them.
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    t_start, t_end = _split_tiles(lo // BLOCK_N, tl.cdiv(seq_len, BLOCK_N), split, NUM_SPLITS, 1)
    if ROPE:  # the split that reads the new token's tile writes its K / V first
        last = (seq_len - 1) // BLOCK_N
        if (seq_len > 0) & (t_start <= last) & (last < t_end):
            _write_new_kv(kv_ptr, k_new_ptr, v_new_ptr, slot_ptr, seq, kv_head, pos, offs_d,
                          cos_ptr, sin_ptr, stride_cos, k_norm_ptr, eps, stride_kt, stride_kh,
                          stride_vt, stride_vh, stride_kv, stride_slot, stride_kvh,
                          inv_k_scale, inv_v_scale, HEAD_DIM, HALF, QK_NORM, FP8_MAX)
        tl.debug_barrier()  # the stores above are visible to this program's loads below

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for t in range(t_start, t_end):
        k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = (k_pos < seq_len) & (k_pos >= lo)
        k, v = _load_kv_tile(kv_ptr, bt_row, k_pos, k_valid, kv_head, offs_d, d_mask,
                              stride_kv, stride_slot, stride_kvh, BLOCK_SIZE)
        s = _scores(q, tl.trans(k.to(q.dtype)), qk_scale, cap_scale, USE_SOFT_CAP,
                    DOT_PRECISION)
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v.to(q.dtype), m_i, l_i, acc, DOT_PRECISION)

    if NUM_SPLITS == 1:
        out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]  # seq_len 0 -> 0
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_valid[:, None] & d_mask[None, :])
        _store_split_stats(part_ml_ptr, part, m_i, l_i, row_valid,
                           num_seqs * num_heads * NUM_SPLITS)
        if FOLD:  # the last split of this (sequence, KV head) to finish combines them all
            counter = count_ptr + seq * num_kv_heads + kv_head
            if _last_arrival(counter, NUM_SPLITS):
                _combine_splits(out_ptr, part_acc_ptr, part_ml_ptr, seq, kv_head * GROUP,
                                stride_os, stride_oh, num_seqs, num_heads, v_scale, GROUP,
                                NUM_SPLITS, GROUP_P2, SPLITS_P2, HEAD_DIM, BLOCK_D)
                tl.atomic_xchg(counter, 0)  # ready for the next launch


@triton.jit
def _write_new_kv(kv_ptr, k_new_ptr, v_new_ptr, slot_ptr, seq, kv_head, pos, offs_d, cos_ptr,
                  sin_ptr, stride_cos, k_norm_ptr, eps, stride_kt, stride_kh, stride_vt,
                  stride_vh, stride_kv, stride_slot, stride_kvh, inv_k_scale, inv_v_scale,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                  FP8_MAX: tl.constexpr):
    """One KV head of the step's token into the cache at its slot (slot < 0: skipped): k
    normalised and rotated (``_rope_rows``), v as is; an fp8 cache stores k / k_scale and
    v / v_scale as ``_rope_write_kv_kernel`` does."""
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    ok = tl.full([1, 1], 1, tl.int1) & (slot >= 0)
    k = _rope_rows(k_new_ptr + seq * stride_kt + kv_head * stride_kh + tl.zeros([1, 1], tl.int64),
                   ok, offs_d, pos, cos_ptr, sin_ptr, stride_cos, k_norm_ptr, eps, HEAD_DIM,
                   HALF, QK_NORM)
    mask = ok & (offs_d < HEAD_DIM)[None, :]
    v = tl.load(v_new_ptr + seq * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=mask,
                other=0.0)
    out_ty = kv_ptr.dtype.element_ty
    if FP8_MAX > 0:
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -FP8_MAX, FP8_MAX)
    dst = kv_ptr + slot * stride_slot + kv_head * stride_kvh + offs_d[None, :]
    tl.store(dst, k.to(out_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(out_ty), mask=mask)


@triton.jit
def _store_split_stats(part_ml_ptr, part, m_i, l_i, mask, num_parts):
    """A split's softmax max and sum at ``part`` of the [2, num_parts] partials (m first,
    then l), the layout the decode kernels' combines read."""
    tl.store(part_ml_ptr + part, m_i, mask=mask)
    tl.store(part_ml_ptr + num_parts + part, l_i, mask=mask)


@triton.jit
def _last_arrival(counter_ptr, arrivals):
    """True in the program that arrives last of ``arrivals`` at ``counter_ptr`` (one of
    ``_split_counters``), after every thread's earlier stores: a block barrier, then an
    acq_rel ticket, so that program sees all the others' partials. It folds them, then
    stores 0 at ``counter_ptr`` (ready for the next launch)."""
    tl.debug_barrier()  # every thread's partials are stored before the ticket
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == arrivals - 1


@triton.jit
def _combine_splits(out_ptr, part_acc_ptr, part_ml_ptr, seq, head0, stride_os, stride_oh,
                    num_seqs, num_heads, v_scale, NUM_HEADS: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, HEADS_P2: tl.constexpr, SPLITS_P2: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[seq, head0:head0 + NUM_HEADS] from the splits' (m, l, acc) partials: each split
    rescaled by exp2(m_s - max m), then sum(acc) / sum(l). The loads bypass L1 (.cg): the
    partials come from other programs of the same launch when the decode kernel folds this."""
    h = tl.arange(0, HEADS_P2)
    sp = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = h < NUM_HEADS
    mask = h_mask[:, None] & (sp < NUM_SPLITS)[None, :]  # [HEADS_P2, SPLITS_P2]
    part = (seq.to(tl.int64) * num_heads + head0 + h)[:, None] * NUM_SPLITS + sp[None, :]
    m = tl.load(part_ml_ptr + part, mask=mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + part, mask=mask, other=0.0,
                cache_modifier=".cg")
    acc = tl.load(part_acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                  mask=mask[:, :, None] & (offs_d < HEAD_DIM)[None, None, :], other=0.0,
                  cache_modifier=".cg")  # [HEADS_P2, SPLITS_P2, BLOCK_D]
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max[:, None])  # empty splits weigh 0
    l_sum = tl.sum(l * w, 1)
    out = tl.sum(acc * w[:, :, None], 1) * (v_scale / tl.where(l_sum == 0.0, 1.0, l_sum))[:, None]
    tl.store(out_ptr + seq * stride_os + (head0 + h)[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, head_dim] fp32
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32
    stride_os, stride_oh, num_seqs, num_heads, v_scale,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    _combine_splits(out_ptr, part_acc_ptr, part_ml_ptr, tl.program_id(0), tl.program_id(1),
                    stride_os, stride_oh, num_seqs, num_heads, v_scale, 1, NUM_SPLITS, 1,
                    SPLITS_P2, HEAD_DIM, BLOCK_D)


def paged_attention_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float, block_size: int,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           fold_reduce: bool | None = None,
                           rope: DecodeRope | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged keys.

    ``rope``: q as the projection left it; the kernel applies the q norm and the rotation
    itself and writes this step's K / V (``rope.k``, ``rope.v``) into the cache before it
    reads them (``rope_write_kv_cache``'s work, one launch fewer a layer).

    q [num_seqs, num_heads, head_dim]; kv_cache [2, num_slots, num_kv_heads, head_dim];
    block_table [num_seqs, max_blocks_per_seq] int32; seq_lens [num_seqs] int32 (0 = padding
    row: its output is zeros) -> out [num_seqs, num_heads, head_dim] (q's dtype).

    The algorithm (grid, splits, tiles, the fold of the partials): the comment above
    ``_paged_decode_kernel``.

    ``num_splits`` None picks a count from the grid size, SM count and the longest context the
    block table can hold (shapes only, so it is fixed under a CUDA graph).
    """
    num_seqs, num_heads, head_dim, num_kv_heads = _decode_shapes(q, kv_cache, block_table,
                                                                 seq_lens)
    out = _out_like(q, out)
    if num_seqs == 0:
        return out
    q = _last_dim_contiguous(q)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_n = _decode_block_n(head_dim, block_size)
    block_h = max(16, triton.next_power_of_2(group))
    num_splits, fold_reduce = _decode_splits(num_splits, fold_reduce, num_seqs, num_kv_heads,
                                             block_table.shape[1], block_size, head_dim,
                                             q.device, group)
    qk_scale, cap_scale = _score_scales(scale, soft_cap)
    part_acc, part_ml = _split_partials(out, num_splits)
    group_p2, splits_p2 = triton.next_power_of_2(group), triton.next_power_of_2(num_splits)
    counts = _split_counters(num_seqs * num_kv_heads, q.device) if fold_reduce else seq_lens
    r = _rope_args(rope, q, kv_cache)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_acc, part_ml, q, kv_cache, block_table, seq_lens, counts, *r["ptrs"],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table.stride(0),
        *r["strides"], num_seqs, num_heads, num_kv_heads, qk_scale * k_scale, cap_scale,
        sliding_window or 0, v_scale, r["eps"], 1.0 / k_scale, 1.0 / v_scale,
        GROUP=group, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=bool(soft_cap),
        DOT_PRECISION=_dot_precision(q.dtype), FOLD=fold_reduce, GROUP_P2=group_p2,
        SPLITS_P2=splits_p2, **r["constexprs"], num_warps=4, num_stages=3, **pdl.options(q))
    if num_splits > 1 and not fold_reduce:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, out.stride(0), out.stride(1), num_seqs, num_heads, v_scale,
            NUM_SPLITS=num_splits, SPLITS_P2=splits_p2, HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4,
            **pdl.options(q))
    return out


def _decode_splits(num_splits: int | None, fold_reduce: bool | None, num_seqs: int,
                   num_kv_heads: int, max_blocks: int, block_size: int, head_dim: int,
                   device: torch.device, group: int) -> tuple[int, bool]:
    """(split count, whether the last split folds the partials) of a decode launch: the
    given ones, or ``decode_num_splits``' count and folding where the partials fit."""
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_blocks, block_size,
                                       head_dim, device, group)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if fold_reduce is None:
        fold_reduce = FOLD_ENV and (triton.next_power_of_2(group)
                                    * triton.next_power_of_2(num_splits)
                                    * triton.next_power_of_2(head_dim) <= FOLD_MAX_ELEMENTS)
    return num_splits, fold_reduce and num_splits > 1


class DecodeRope(NamedTuple):
    """This step's k / v [num_seqs, num_kv_heads, head_dim] and how they and q are rotated
    (``rope_write_kv_cache``'s arguments), for ``paged_attention_decode`` to do that work."""
    k: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rotary_dim: int
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 1e-6


def _rope_args(rope: DecodeRope | None, q: torch.Tensor, kv_cache: torch.Tensor) -> dict:
    """The decode kernel's ROPE arguments (placeholders when ``rope`` is None), checked."""
    if rope is None:
        return {"ptrs": (q,) * 8, "strides": (0,) * 5, "eps": 1e-6,
                "constexprs": dict(ROPE=False, HALF=1, QK_NORM=False, FP8_MAX=0)}
    num_seqs, _, head_dim = q.shape
    kv_shape = (num_seqs, kv_cache.shape[2], head_dim)
    if rope.k.shape != kv_shape or rope.v.shape != kv_shape:
        raise ValueError(f"rope k {tuple(rope.k.shape)} / v {tuple(rope.v.shape)} must be "
                         f"{kv_shape}")
    if rope.slot_mapping.shape[0] < num_seqs or rope.positions.shape[0] < num_seqs:
        raise ValueError("rope slot_mapping / positions need a row per sequence")
    if rope.rotary_dim % 2 or not 0 < rope.rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rope.rotary_dim} must be even and in (0, {head_dim}]")
    if (rope.q_norm is None) != (rope.k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    k, v = _last_dim_contiguous(rope.k), _last_dim_contiguous(rope.v)
    norms = (rope.q_norm, rope.k_norm) if rope.q_norm is not None else (q, q)
    return {"ptrs": (k, v, rope.slot_mapping, rope.positions, rope.cos, rope.sin, *norms),
            "strides": (k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                        rope.cos.stride(0)),
            "eps": rope.eps,
            "constexprs": dict(ROPE=True, HALF=rope.rotary_dim // 2,
                               QK_NORM=rope.q_norm is not None,
                               FP8_MAX=_fp8_max(kv_cache.dtype))}


def _decode_shapes(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_seqs, num_heads, head_dim, num_kv_heads) of a decode call; ValueError for
    inconsistent shapes."""
    _check_cache(kv_cache)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    _check_heads(num_heads, num_kv_heads, head_dim, kv_cache)
    if block_table.dim() != 2 or block_table.shape[0] != num_seqs or seq_lens.shape != (num_seqs,):
        raise ValueError(f"block_table {tuple(block_table.shape)} / seq_lens "
                         f"{tuple(seq_lens.shape)} must be [{num_seqs}, max_blocks] / [{num_seqs}]")
    return num_seqs, num_heads, head_dim, num_kv_heads


def _split_partials(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (acc [num_seqs, num_heads, splits, head_dim], (m, l) [2, num_seqs, num_heads,
    splits]) for a split decode; ``out`` twice (unused placeholders) for one split."""
    if num_splits == 1:
        return out, out
    num_seqs, num_heads, head_dim = out.shape
    part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim,
                           dtype=torch.float32, device=out.device)
    part_ml = torch.empty(2, num_seqs, num_heads, num_splits,
                          dtype=torch.float32, device=out.device)
    return part_acc, part_ml


FOLD_ENV = switches().decode_fold  # PAGEDLLM_DECODE_FOLD
FOLD_MAX_ELEMENTS = 4096  # fp32 partials the folding program holds: 32 registers a thread
FOLD_SPLIT_MAX_TILES = 16  # key tiles a split may take so that the splits fold (1k keys)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    """A persistent zeroed int32 buffer of at least n counters for folded split reduces
    (every launch leaves it zeroed). The first one is made large enough for any CUDA graph
    capture (256 sequences x 32 KV heads), so captures never allocate it."""
    counts = _COUNTERS.get(device)
    if counts is None or counts.numel() < n:
        counts = _COUNTERS[device] = torch.zeros(max(n, 8192), dtype=torch.int32,
                                                 device=device)
    return counts


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_blocks_per_seq: int,
                      block_size: int, head_dim: int, device: torch.device,
                      group: int = 1) -> int:
    """The split count ``paged_attention_decode`` picks when given none (shapes only).

    Split the keys only when the (sequence, KV head) programs alone leave SMs idle: aim for
    about two programs per SM, each split keeping at least two key tiles, at most 64 splits.
    Where that many splits' partials would not fit the folding program (``group`` query
    heads per KV head; FOLD_MAX_ELEMENTS) but fewer splits would, each keeping at most
    FOLD_SPLIT_MAX_TILES key tiles, take fewer: the separate reduce launch costs more than
    the longer splits at such contexts (Qwen3-30B-A3B, 8 heads a KV head, 1k contexts).
    """
    num_programs = num_seqs * num_kv_heads
    max_tiles = triton.cdiv(max_blocks_per_seq * block_size, _decode_block_n(head_dim, block_size))
    num_sms = _num_sms(device)
    if num_programs >= num_sms or max_tiles < 4:
        return 1
    splits = max(1, min(triton.cdiv(2 * num_sms, num_programs), max_tiles // 2, 64))
    # a power of two: NUM_SPLITS is a compile-time constant, and eager decodes (mixed batches)
    # see block tables of every width; rounding keeps the variants to seven
    splits = 1 << (splits.bit_length() - 1)
    per_split = triton.next_power_of_2(group) * triton.next_power_of_2(head_dim)
    fold_splits = max(1, FOLD_MAX_ELEMENTS // per_split)
    if (FOLD_ENV and splits > fold_splits
            and triton.cdiv(max_tiles, fold_splits) <= FOLD_SPLIT_MAX_TILES):
        return 1 << (fold_splits.bit_length() - 1)
    return splits


def _decode_block_n(head_dim: int, block_size: int) -> int:
    """Keys per decode tile: 64 (32 for head_dim > 128), never under 16 (tl.dot) or a block."""
    return max(16, block_size, 64 if head_dim <= 128 else 32)


def paged_attention_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                               scale: float, block_size: int, sliding_window: int | None = None,
                               soft_cap: float | None = None, k_scale: float = 1.0,
                               v_scale: float = 1.0) -> torch.Tensor:
    """Reference: ``torch_ref.paged_attention`` with every row a decode; rows with
    seq_len 0 give zeros. Same shapes as ``paged_attention_decode``."""
    meta = AttentionMetadata(
        block_size=block_size, slot_mapping=seq_lens.new_empty(0, dtype=torch.long),
        num_decodes=q.shape[0], decode_seq_lens=seq_lens.long(),
        decode_block_table=block_table.long(), prefills=[])
    out = _paged_attention_ref(q, kv_cache, meta, scale=scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    return torch.where((seq_lens > 0)[:, None, None], out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# Prefill: varlen causal queries over context + new keys
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["stride_bt", "sliding_window"])
def _paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    kv_ptr,  # [2, num_slots, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32: context + new tokens
    query_start_loc_ptr,  # [num_seqs + 1] int32
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_slot, stride_kvh, stride_bt,
    qk_scale, cap_scale, sliding_window, v_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)  # longest (last) tiles start first
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M] row r = (token r // GROUP, head r % GROUP)
    tok = q_tile * BLOCK_Q + rows // GROUP  # index within this sequence's queries
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx_len + tok  # absolute position of each row's query
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64) * stride_qt + heads * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # Keys any row of the tile sees: [first query's window start, last query's position].
    last_pos = ctx_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_len + q_tile * BLOCK_Q - sliding_window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range((lo // BLOCK_N) * BLOCK_N, last_pos + 1, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = (k_pos <= last_pos) & (k_pos >= lo)
        k, v = _load_kv_tile(kv_ptr, bt_row, k_pos, k_valid, kv_head, offs_d, d_mask,
                              stride_kv, stride_slot, stride_kvh, BLOCK_SIZE)
        s = _scores(q, tl.trans(k.to(q.dtype)), qk_scale, cap_scale, USE_SOFT_CAP,
                    DOT_PRECISION)
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v.to(q.dtype), m_i, l_i, acc, DOT_PRECISION)

    out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & d_mask[None, :])


def paged_attention_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *,
                            scale: float, block_size: int, max_query_len: int,
                            sliding_window: int | None = None, soft_cap: float | None = None,
                            out: torch.Tensor | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of varlen query chunks over their cached context and themselves.

    q [num_tokens, num_heads, head_dim]; kv_cache [2, num_slots, num_kv_heads, head_dim] (the
    new tokens' K/V already written); block_tables [num_seqs, max_blocks_per_seq] int32;
    seq_lens [num_seqs] int32 (context + new); query_start_loc [num_seqs + 1] int32;
    max_query_len >= every q_len -> out [num_tokens, num_heads, head_dim] (q's dtype).
    Query i of a sequence sits at position seq_len - q_len + i and sees keys at positions
    <= its own (and > position - sliding_window when set).

    1. grid (num_seqs, cdiv(max_query_len, BLOCK_Q), num_kv_heads): a program takes BLOCK_Q
       consecutive queries of one sequence times the ``group`` query heads of one KV head,
       BLOCK_M = BLOCK_Q * group rows (padded); tiles past the sequence's q_len exit at once;
    2. keys from the first row's window start to the last row's position, BLOCK_N at a time,
       gathered through the block table;
    3. per key tile: scores = tl.dot(Q, K^T) * scale (soft-capped), causal/window mask per
       row, online softmax in fp32 (exp2), acc += tl.dot(P, V);
    4. write acc / l (rows that saw no key: zeros).
    """
    _check_cache(kv_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    _check_heads(num_heads, num_kv_heads, head_dim, kv_cache)
    num_seqs = query_start_loc.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            seq_lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / seq_lens "
                         f"{tuple(seq_lens.shape)} must be [{num_seqs}, max_blocks] / [{num_seqs}]")
    out = _out_like(q, out)
    if num_tokens == 0 or num_seqs <= 0 or max_query_len <= 0:
        return out
    q = _last_dim_contiguous(q)
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_m = max(128 if head_dim <= 128 else 64, triton.next_power_of_2(group))
    block_q = block_m // group
    block_n = max(16, block_size, 64 if head_dim <= 128 else 32)
    qk_scale, cap_scale = _score_scales(scale, soft_cap)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_prefill_kernel[grid](
        out, q, kv_cache, block_tables, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_tables.stride(0),
        qk_scale * k_scale, cap_scale, sliding_window or 0, v_scale,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, USE_WINDOW=sliding_window is not None,
        USE_SOFT_CAP=bool(soft_cap), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=8 if block_m >= 128 else 4, num_stages=2)
    return out


def paged_attention_prefill_ref(q: torch.Tensor, kv_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, *, scale: float, block_size: int,
                                sliding_window: int | None = None,
                                soft_cap: float | None = None, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> torch.Tensor:
    """Reference: ``torch_ref.paged_attention`` with every sequence a prefill (syncs).
    Same shapes as ``paged_attention_prefill``."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    prefills = []
    for i, seq_len in enumerate(lens):
        num_q = starts[i + 1] - starts[i]
        if num_q > 0:
            blocks = block_tables[i, :triton.cdiv(seq_len, block_size)].long()
            prefills.append(PrefillSeq(starts[i], num_q, seq_len, blocks))
    meta = AttentionMetadata(block_size=block_size,
                             slot_mapping=seq_lens.new_empty(0, dtype=torch.long),
                             num_decodes=0, decode_seq_lens=None, decode_block_table=None,
                             prefills=prefills)
    out = _paged_attention_ref(q, kv_cache, meta, scale=scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)
    covered = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    for seq in prefills:
        covered[seq.token_start:seq.token_start + seq.num_query_tokens] = True
    return torch.where(covered[:, None, None], out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[0] != 2 or kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache must be [2, num_slots, num_kv_heads, head_dim] with a "
                         f"contiguous last dim, got shape {tuple(kv_cache.shape)} "
                         f"strides {kv_cache.stride()}")


def _check_heads(num_heads: int, num_kv_heads: int, head_dim: int,
                 kv_cache: torch.Tensor) -> None:
    if num_heads % num_kv_heads or kv_cache.shape[3] != head_dim:
        raise ValueError(f"q has {num_heads} heads of dim {head_dim}; kv_cache has "
                         f"{num_kv_heads} heads of dim {kv_cache.shape[3]} (num_heads must be a "
                         "multiple of num_kv_heads and head dims must match)")


def _out_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must match q {tuple(q.shape)} with a "
                         "contiguous last dim")
    return out


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _score_scales(scale: float, soft_cap: float | None) -> tuple[float, float]:
    """(qk_scale, cap_scale) so scores in log2 units are qk * qk_scale, or with a soft cap
    cap_scale * tanh(qk * qk_scale)."""
    if soft_cap:
        return scale / soft_cap, soft_cap * _LOG2E
    return scale * _LOG2E, 1.0


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models must match the fp32 CPU path: no tf32 in the matrix units for them.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the interpreter on CPU: any count exercises the same code


__all__ = ["write_kv_cache", "write_kv_cache_ref", "rope_write_kv_cache", "rope_write_kv_cache_ref",
           "paged_attention_decode", "decode_num_splits",
           "paged_attention_decode_ref", "paged_attention_prefill", "paged_attention_prefill_ref"]
