"""Multi-head latent attention (DeepSeek-V2/V3) decode in Triton: the absorbed form over the
paged latent cache, in the paged decode kernel family of ``triton_attention.py``.

Layout (``cache_spec.py``, ``mla.py``): per layer the cache is [1, num_slots, 1, RANK + ROPE],
a token's row the normalised latent ``c`` (``kv_lora_rank`` = RANK) then its rotated rope key
``k_pe`` (ROPE). The absorbed query of head h is ``[W_UK[h]^T q_nope ; q_pe]`` (RANK + ROPE),
so decode is multi-query attention over the cache rows themselves: keys ``[c ; k_pe]``, values
``c`` (the first RANK dims of the same row), one shared "KV head" for all query heads.
``mla.py``'s ``mla_decode`` is the reference (and the CPU path).

The decode algorithm (``mla_decode_attention``):
1. grid (num_seqs, cdiv(num_heads, BLOCK_H), num_splits): a program takes one sequence and
   BLOCK_H query heads (rows of its query tile; heads past num_heads masked), so every key
   tile loaded from the cache feeds BLOCK_H heads through the tensor cores;
2. the head dim RANK + ROPE (512 + 64 on the real models: no power of two) is held as two
   tiles, a RANK part and a ROPE part, each padded to a power of two and masked;
3. the keys [0, seq_len) are cut into BLOCK_N-key tiles and split ``s`` takes the s-th equal
   share of them; per tile the rows are gathered through the block table (slot =
   block_id * block_size + offset) once: scores = tl.dot(q_c, c^T) + tl.dot(q_pe, k_pe^T) in
   log2 units, online softmax in fp32 (``_softmax_step``), acc += tl.dot(p, c);
4. one split: write acc / l. Several: write (m, l, acc) partials; the last split program of
   each (sequence, head tile) to finish combines them (a ticket counter per tile, as the
   paged decode folds; ``_mla_combine`` walks the splits so only one [BLOCK_H, RANK] tile is
   live), or, where that walk is long or ``PAGEDLLM_DECODE_FOLD=0``, a reduce kernel does
   it per (sequence, head, rank chunk). A split takes MIN_SPLIT_TILES key tiles at least;
   splits past a short context's keys store no partial tile and are never read.
A sequence of length 0 (CUDA-graph padding) gives zeros. No host syncs: the grid, split count
and block sizes depend only on shapes, loop bounds come from ``seq_lens`` read in the kernel.

``write_latent`` stores each new token's latent row at its slot, skipping slots < 0 (CUDA
graph padding rows), which ``index_copy_`` cannot do without a host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_attention import (FOLD_ENV, _LOG2E, _dot_precision,
                                                 _last_arrival, _num_sms, _softmax_step,
                                                 _split_counters, _split_tiles,
                                                 _store_split_stats)
from pagedllm.layers import pdl

# the split walk the folding program may take (each step one [BLOCK_H, RANK] fp32 tile)
FOLD_MAX_SPLITS = 8
# Key tiles a split takes at least (in the kernel, from seq_len): a split's partial is a
# [BLOCK_H, RANK] fp32 tile (64 KB at 32 heads, rank 512), a key tile 36 KB of bf16
# latents, so shorter splits would move more partials than keys. The split count comes
# from the block table's width (fixed under a CUDA graph: the longest capturable context),
# so short contexts leave the splits past their keys empty; those store no partial tile.
MIN_SPLIT_TILES = 4
# fp32 partial bytes (nd * H * splits * RANK * 4) the split count may make: they are
# written and read back once, and should stay well inside L2
MAX_PARTIAL_BYTES = 4 << 20
# ranks reduced per program of the separate reduce kernel
REDUCE_BLOCK_R = 128


@triton.jit
def _mla_combine(out_ptr, part_acc_ptr, part_ml_ptr, seq, heads, h_mask, offs_r, r_mask,
                 stride_os, stride_oh, num_seqs, num_heads, NUM_SPLITS: tl.constexpr,
                 SPLITS_P2: tl.constexpr, RANK: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """out[seq, heads] from the splits' (m, l, acc) partials: each split rescaled by
    exp2(m_s - max m), then sum(acc) / sum(l); the splits are walked one at a time so a
    single [BLOCK_H, RANK] tile is live, and empty ones (m = -inf) are not read. Loads
    bypass L1 (.cg): the partials come from other programs of the same launch."""
    part0 = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS  # [BLOCK_H]
    sp = tl.arange(0, SPLITS_P2)
    ml_mask = h_mask[:, None] & (sp < NUM_SPLITS)[None, :]
    l_off = num_seqs * num_heads * NUM_SPLITS
    m = tl.load(part_ml_ptr + part0[:, None] + sp[None, :], mask=ml_mask, other=float("-inf"),
                cache_modifier=".cg")
    l = tl.load(part_ml_ptr + l_off + part0[:, None] + sp[None, :], mask=ml_mask, other=0.0,
                cache_modifier=".cg")
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.sum(l * tl.math.exp2(m - m_max[:, None]), 1)  # empty splits weigh 0
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    mask = h_mask[:, None] & r_mask[None, :]
    for s in range(NUM_SPLITS):
        m_s = tl.load(part_ml_ptr + part0 + s, mask=h_mask, other=float("-inf"),
                      cache_modifier=".cg")
        live = mask & (m_s > float("-inf"))[:, None]  # an empty split stored no tile
        a = tl.load(part_acc_ptr + (part0 + s)[:, None] * RANK + offs_r[None, :], mask=live,
                    other=0.0, cache_modifier=".cg")
        acc += a * tl.math.exp2(m_s - m_max)[:, None]
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_r[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# Arguments that change from step to step are not specialized on (see _paged_decode_kernel).
@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])
def _mla_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, RANK] (NUM_SPLITS == 1, or FOLD)
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, RANK] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32: running max (log2), sum
    q_ptr,  # [num_seqs, num_heads, RANK + ROPE]: absorbed q_nope, then q_pe
    cache_ptr,  # [num_slots, RANK + ROPE] rows (slot stride stride_slot)
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    count_ptr,  # [num_seqs * head tiles] int32 zeros: splits done (FOLD)
    stride_qs, stride_qh, stride_os, stride_oh, stride_slot, stride_bt,
    num_seqs, num_heads, qk_scale,
    RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, MIN_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FOLD: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.launch_dependents(USE_PDL)
    seq = tl.program_id(0)
    head_tile = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)  # written before the step's kernels
    pdl.wait(USE_PDL)  # q and this step's latents come from the kernels before

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_mask = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < RANK
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < ROPE
    q_row = q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh  # [BLOCK_H, 1]
    q_c = tl.load(q_row + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q_pe = tl.load(q_row + RANK + offs_p[None, :], mask=h_mask[:, None] & p_mask[None, :],
                   other=0.0)

    # This split's equal share of the key tiles covering [0, seq_len), MIN_TILES at least.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    t_start, t_end = _split_tiles(0, num_tiles, split, NUM_SPLITS, MIN_TILES)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for t in range(t_start, t_end):
        k_pos = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = k_pos < seq_len
        block_ids = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        rows = cache_ptr + (block_ids.to(tl.int64) * BLOCK_SIZE + k_pos % BLOCK_SIZE)[:, None] \
            * stride_slot  # [BLOCK_N, 1]
        c = tl.load(rows + offs_r[None, :], mask=k_valid[:, None] & r_mask[None, :],
                    other=0.0).to(q_c.dtype)  # keys' latent part and the values, loaded once
        k_pe = tl.load(rows + RANK + offs_p[None, :], mask=k_valid[:, None] & p_mask[None, :],
                       other=0.0).to(q_c.dtype)
        s = tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        s = tl.dot(q_c, tl.trans(c), s, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(k_valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, c, m_i, l_i, acc, DOT_PRECISION)

    o_mask = h_mask[:, None] & r_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seq_len 0 -> 0
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_r[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_acc_ptr + part[:, None] * RANK + offs_r[None, :], acc,
                 mask=o_mask & (t_start < num_tiles))  # empty split: m = -inf says so
        _store_split_stats(part_ml_ptr, part, m_i, l_i, h_mask,
                           num_seqs * num_heads * NUM_SPLITS)
        if FOLD:  # the last split of this (sequence, head tile) to finish combines them all
            counter = count_ptr + seq * tl.num_programs(1) + head_tile
            if _last_arrival(counter, NUM_SPLITS):
                _mla_combine(out_ptr, part_acc_ptr, part_ml_ptr, seq, heads, h_mask, offs_r,
                             r_mask, stride_os, stride_oh, num_seqs, num_heads, NUM_SPLITS,
                             SPLITS_P2, RANK, BLOCK_H, BLOCK_R)
                tl.atomic_xchg(counter, 0)  # ready for the next launch


@triton.jit(do_not_specialize=["num_seqs"])
def _mla_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, RANK]
    part_acc_ptr,  # [num_seqs, num_heads, NUM_SPLITS, RANK] fp32
    part_ml_ptr,  # [2, num_seqs, num_heads, NUM_SPLITS] fp32
    stride_os, stride_oh, num_seqs, num_heads,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, RANK: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
):
    """The splits of one (sequence, head) combined over BLOCK_R of its ranks, all splits at
    once (empty ones, m = -inf, not read): grid (num_seqs, num_heads, cdiv(RANK, BLOCK_R))."""
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < RANK
    sp = tl.arange(0, SPLITS_P2)
    s_mask = sp < NUM_SPLITS
    part = (seq * num_heads + head) * NUM_SPLITS + sp  # [SPLITS_P2]
    m = tl.load(part_ml_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + part, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)  # empty splits weigh 0
    l_sum = tl.sum(l * w, 0)
    live = (m > float("-inf"))[:, None] & r_mask[None, :]
    acc = tl.load(part_acc_ptr + part[:, None] * RANK + offs_r[None, :], mask=live, other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_r,
             out.to(out_ptr.dtype.element_ty), mask=r_mask)


def mla_decode_config(num_heads: int, kv_lora_rank: int, dtype: torch.dtype
                      ) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) of the decode kernel (shapes only).

    BLOCK_H query heads share each key tile (16 at least: tl.dot; 32 where there are more
    heads, so 128 heads read each key tile 4 times, mostly from L2); the [BLOCK_H, RANK] fp32
    accumulator and the [BLOCK_N, RANK] latent tile bound it. At rank 512 the sm_90 builds
    (``benchmarks/triton_aot_check.py --only mla``, ``--sweep`` for the others): bf16
    16/32/8 warps 109-152 registers, 32/32/8 warps 141-197, fp32 16/16/4 warps 224-248, no
    spills; BLOCK_H 64 spills at any BLOCK_N or warp count, as do 32 heads with 4 warps and
    fp32 with 32 heads or with 8 warps."""
    block_h = 32 if num_heads > 16 else 16
    if triton.next_power_of_2(kv_lora_rank) < 256:  # small latents (tests, tiny models)
        return block_h, 32, 4, 2
    if dtype == torch.float32:
        return 16, 16, 4, 2
    return block_h, 32, 8, 2


def mla_num_splits(num_seqs: int, num_heads: int, max_blocks_per_seq: int, block_size: int,
                   kv_lora_rank: int, dtype: torch.dtype, device: torch.device) -> int:
    """The split count ``mla_decode_attention`` picks when given none (shapes only, so it
    is fixed under a CUDA graph): split the keys only when the (sequence, head tile)
    programs alone leave SMs idle, aiming at two programs a SM, each split keeping at least
    MIN_SPLIT_TILES key tiles of the longest context the block table holds, the partials
    within MAX_PARTIAL_BYTES, at most 64 splits, a power of two (few compiled variants)."""
    block_h, block_n, _, _ = mla_decode_config(num_heads, kv_lora_rank, dtype)
    num_programs = num_seqs * triton.cdiv(num_heads, block_h)
    max_tiles = triton.cdiv(max_blocks_per_seq * block_size, block_n)
    num_sms = _num_sms(device)
    if num_programs >= num_sms or max_tiles < 2 * MIN_SPLIT_TILES:
        return 1
    by_bytes = MAX_PARTIAL_BYTES // (num_seqs * num_heads * kv_lora_rank * 4)
    splits = max(1, min(triton.cdiv(2 * num_sms, num_programs), max_tiles // MIN_SPLIT_TILES,
                        by_bytes, 64))
    return 1 << (splits.bit_length() - 1)


def _check_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, kv_lora_rank: int) -> None:
    if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[2] != 1 or cache.stride(-1) != 1:
        raise ValueError(f"MLA cache must be [1, num_slots, 1, latent_dim] with a contiguous "
                         f"last dim, got shape {tuple(cache.shape)} strides {cache.stride()}")
    nd, _, dim = q.shape
    if dim != cache.shape[-1] or not 0 < kv_lora_rank < dim:
        raise ValueError(f"q head dim {dim} must equal the cache's latent dim "
                         f"{cache.shape[-1]} (kv_lora_rank {kv_lora_rank} + rope dims)")
    if block_table.dim() != 2 or block_table.shape[0] != nd or seq_lens.shape != (nd,):
        raise ValueError(f"block_table {tuple(block_table.shape)} / seq_lens "
                         f"{tuple(seq_lens.shape)} must be [{nd}, max_blocks] / [{nd}]")


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                         seq_lens: torch.Tensor, *, scale: float, block_size: int,
                         kv_lora_rank: int, num_splits: int | None = None,
                         fold_reduce: bool | None = None,
                         min_split_tiles: int = MIN_SPLIT_TILES) -> torch.Tensor:
    """Absorbed MLA decode attention of one query token per sequence over the latent cache.

    q [nd, H, kv_lora_rank + rope] (absorbed q_nope, then q_pe); cache [1, num_slots, 1,
    kv_lora_rank + rope]; block_table [nd, max_blocks] int32; seq_lens [nd] int32 (0:
    padding, zeros out) -> o_latent [nd, H, kv_lora_rank] (q's dtype): softmax(q . [c ; k_pe]
    * scale) over each sequence's tokens, applied to their ``c``.

    The algorithm: this module's docstring. ``num_splits`` None picks a count from shapes
    only (``mla_num_splits``); ``fold_reduce`` None folds the splits in the decode kernel
    when they are few (FOLD_MAX_SPLITS) and ``PAGEDLLM_DECODE_FOLD`` is not 0; each split
    takes ``min_split_tiles`` key tiles at least (tests lower it to fill every split).
    """
    _check_decode(q, cache, block_table, seq_lens, kv_lora_rank)
    nd, num_heads, dim = q.shape
    out = torch.empty(nd, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    if nd == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_h, block_n, num_warps, num_stages = mla_decode_config(num_heads, kv_lora_rank,
                                                                q.dtype)
    if num_splits is None:
        num_splits = mla_num_splits(nd, num_heads, block_table.shape[1], block_size,
                                    kv_lora_rank, q.dtype, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if fold_reduce is None:
        fold_reduce = FOLD_ENV and num_splits <= FOLD_MAX_SPLITS
    fold_reduce = fold_reduce and num_splits > 1
    head_tiles = triton.cdiv(num_heads, block_h)
    part_acc, part_ml = _partials(nd, num_heads, num_splits, kv_lora_rank, out)
    counts = _split_counters(nd * head_tiles, q.device) if fold_reduce else seq_lens
    block_r = triton.next_power_of_2(kv_lora_rank)
    splits_p2 = triton.next_power_of_2(num_splits)
    _mla_decode_kernel[(nd, head_tiles, num_splits)](
        out, part_acc, part_ml, q, cache, block_table, seq_lens, counts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(1),
        block_table.stride(0), nd, num_heads, scale * _LOG2E,
        RANK=kv_lora_rank, ROPE=dim - kv_lora_rank, BLOCK_R=block_r,
        BLOCK_P=max(16, triton.next_power_of_2(dim - kv_lora_rank)), BLOCK_H=block_h,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, SPLITS_P2=splits_p2,
        MIN_TILES=min_split_tiles, DOT_PRECISION=_dot_precision(q.dtype), FOLD=fold_reduce,
        num_warps=num_warps, num_stages=num_stages, **pdl.options(q))
    if num_splits > 1 and not fold_reduce:
        block_rc = min(REDUCE_BLOCK_R, block_r)
        _mla_reduce_kernel[(nd, num_heads, triton.cdiv(kv_lora_rank, block_rc))](
            out, part_acc, part_ml, out.stride(0), out.stride(1), nd, num_heads,
            NUM_SPLITS=num_splits, SPLITS_P2=splits_p2, RANK=kv_lora_rank, BLOCK_R=block_rc,
            num_warps=4, **pdl.options(q))
    return out


def _partials(nd: int, num_heads: int, num_splits: int, rank: int,
              out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (acc [nd, H, splits, rank], (m, l) [2, nd, H, splits]); ``out`` twice (unused
    placeholders) for one split."""
    if num_splits == 1:
        return out, out
    return (torch.empty(nd, num_heads, num_splits, rank, dtype=torch.float32, device=out.device),
            torch.empty(2, nd, num_heads, num_splits, dtype=torch.float32, device=out.device))


@triton.jit
def _write_latent_kernel(
    cache_ptr,  # [num_slots, DIM] rows (slot stride stride_slot)
    latent_ptr,  # [num_tokens, DIM]
    slot_mapping_ptr,  # [num_tokens] int64 (or int32); < 0 = skip
    stride_lt, stride_slot,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.launch_dependents(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)  # written before the step's kernels
    pdl.wait(USE_PDL)
    offs = tl.arange(0, BLOCK_D)
    mask = (offs < DIM) & (slot >= 0)
    x = tl.load(latent_ptr + tok * stride_lt + offs, mask=mask)
    tl.store(cache_ptr + slot * stride_slot + offs, x.to(cache_ptr.dtype.element_ty), mask=mask)


def write_latent(cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``latent`` [num_tokens, latent_dim] rows at ``slot_mapping`` in the MLA cache
    [1, num_slots, 1, latent_dim]; tokens whose slot is < 0 are skipped (CUDA-graph padding)."""
    num_tokens, dim = latent.shape
    if cache.dim() != 4 or cache.shape[-1] != dim or cache.stride(-1) != 1:
        raise ValueError(f"latent {tuple(latent.shape)} does not fit the MLA cache "
                         f"{tuple(cache.shape)} (contiguous last dim of {dim})")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    if num_tokens == 0:
        return
    latent = latent if latent.stride(-1) == 1 else latent.contiguous()
    _write_latent_kernel[(num_tokens,)](
        cache, latent, slot_mapping, latent.stride(0), cache.stride(1), DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim), num_warps=4, **pdl.options(latent))


__all__ = ["mla_decode_attention", "mla_decode_config", "mla_num_splits", "write_latent",
           "FOLD_MAX_SPLITS", "MIN_SPLIT_TILES", "MAX_PARTIAL_BYTES"]
