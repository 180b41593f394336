"""Triton weight-only int4 / int8 matmuls (W4A16, W8A16) with the dequantization fused: one
kernel family for the GPTQ, AWQ and compressed-tensors pack-quantized layouts, x [M, K]
(fp16 / bf16 / fp32) times the quantized [K, N] weight, fp32 accumulation.

Layouts (``WNA16Weight`` holds strided views, no copies):
- packed along K (GPTQ ``qweight`` [K/pack, N]; compressed-tensors ``weight_packed``
  [N, K/pack] seen transposed): value j of a word is row ``k = word_row * pack + j``;
- packed along N (AWQ ``qweight`` [K, N/8], in the interleaved order 0 2 4 6 1 3 5 7: column
  n sits in slot (n%2)*4 + (n%8)//2);
- zero points packed along N in every layout ([G, N/pack], AWQ interleaved), or none
  (symmetric compressed-tensors: the constant ``zero_offset``, 2**(bits-1)); GPTQ v1 adds
  ``zero_offset`` 1 to each stored zero; scales [G, N]; each row's group is ``k //
  group_size`` or, with act-order, ``g_idx[k]``.
W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n].

Kernels: a GEMV for one-row inputs of the K-packed layouts (batch-1 decode: each program
loads a [BLOCK_K / pack, BLOCK_N] tile of words with 16-byte loads, and for each of the pack
values in a word multiplies the decoded rows by x elementwise; the K range is split over
programs so the SMs fill, fp32 partial sums folded by the last program of each column tile),
and a ``tl.dot`` GEMM for more rows (split-K too while the batch is memory-bound; up to 32
rows as W^T x^T, ``GEMM_SWAP``) that also reads AWQ's own layout; from
``DEQUANT_MIN_ROWS`` rows (prefill) one kernel dequantizes the weight and cuBLAS multiplies.
The AWQ method repacks its weight at load on CUDA (``repack_awq``) so that decode takes the
GEMV.
Without act-order a K tile lies inside one group, so its zeros and scales are one row.
The GEMV decodes codes where they lie in the word, with 2**23's exponent ORed in
(``_code_at``: one LOP3 and one FADD a value, no shift, no int-to-float conversion). (The
GEMM did so too, one tl.dot per value position, for 16 rows: no faster per kernel on the
H100, and 0.71x bf16 instead of 1.03x in 16-row engine decode: reverted.) The
torch dequantize-then-matmul references of ``packing.py`` / the quant methods are the oracle
(tests/kernels/test_wna16.py); ``benchmarks/triton_aot_check.py`` compiles every variant for
sm_90 without a GPU (registers, spills, load widths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_attention import _last_arrival, _split_counters
from pagedllm.layers import pdl
from pagedllm.switches import switches


@triton.jit
def _to_float(codes):
    """Non-negative int32 codes below 2**23 to fp32 without I2F (a quarter-rate instruction
    on Hopper: the GEMV would be bound by it): 2**23 + code read as a float, minus 2**23."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _code_at(words, hi_words, magic, J: tl.constexpr, BITS: tl.constexpr):
    """Value ``J`` of each word, times 2**p, as fp32, in two integer-pipe instructions less
    than shift + mask + ``_to_float``: the value is masked where it lies (p = its bit
    position) and the mask ORed with 2**23's exponent in one LOP3; the float read from those
    bits is 2**23 + code * 2**p, exact while the field ends below bit 23. Values above that
    are read from ``hi_words`` (the words shifted right by ``_hi_shift``, once per word). The
    caller multiplies x by 2**-p (exact) instead of scaling the code."""
    FIT: tl.constexpr = 23 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if J < FIT:
        bits = (words & (MASK << (J * BITS))) | magic
    else:
        bits = (hi_words & (MASK << (J * BITS - _hi_shift(BITS)))) | magic
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _add_value(qx, words, hi_words, magic, xj, J: tl.constexpr, BITS: tl.constexpr):
    """qx + value J of each word (``_code_at``, times 2**p) times x at its rows times 2**-p."""
    return qx + _code_at(words, hi_words, magic, J, BITS) * (xj * _code_scale(J, BITS))[:, None]


@triton.jit
def _hi_shift(BITS: tl.constexpr):
    """How far ``hi_words`` are shifted: one value less than FIT fields where the highest
    value then still ends below bit 23 (4-bit: 16, so value 5 sits at bits 4-7 and the mask
    is one LOP3; at bits 0-3 the compiler chose extract + LOP3), else FIT fields."""
    FIT: tl.constexpr = 23 // BITS
    PACK: tl.constexpr = 32 // BITS
    if (PACK - FIT + 1) * BITS <= 23:
        shift: tl.constexpr = (FIT - 1) * BITS
    else:
        shift: tl.constexpr = FIT * BITS
    return shift


@triton.jit
def _code_scale(J: tl.constexpr, BITS: tl.constexpr):
    """2**-p for ``_code_at``'s value J (a power of two: multiplying x by it is exact)."""
    FIT: tl.constexpr = 23 // BITS
    if J < FIT:
        scale = 1.0 / (1 << (J * BITS))
    else:
        scale = 1.0 / (1 << (J * BITS - _hi_shift(BITS)))
    return scale


@triton.jit
def _unpack_rows(words, BITS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """[R, C] words packed along rows -> [R * PACK, C] codes (value j -> row r*PACK + j)."""
    PACK: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PACK) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (R * PACK, C))


@triton.jit
def _unpack_cols(words, AWQ: tl.constexpr, BITS: tl.constexpr, R: tl.constexpr,
                 C: tl.constexpr):
    """[R, C] words packed along columns -> [R, C * PACK] codes (AWQ: interleaved slots)."""
    PACK: tl.constexpr = 32 // BITS
    pos = tl.arange(0, PACK)
    if AWQ:
        slot = (pos % 2) * 4 + pos // 2
    else:
        slot = pos
    codes = (words[:, :, None] >> (slot * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (R, C * PACK))


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, n0, N, K, group_size, zero_offset,
                  stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                  BITS: tl.constexpr, AWQ: tl.constexpr, ACT_ORDER: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fp32 weight tile W[k0:k0+BLOCK_K, n0:n0+BLOCK_N] (zeros outside [K, N])."""
    PACK: tl.constexpr = 32 // BITS
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    words_n = n0 // PACK + tl.arange(0, BLOCK_N // PACK)  # packed-along-N word columns
    n_ok = offs_n < N
    wn_ok = words_n * PACK < N
    if AWQ:
        words = tl.load(qw_ptr + offs_k[:, None] * stride_qk + words_n[None, :] * stride_qn,
                        mask=(offs_k < K)[:, None] & wn_ok[None, :], other=0)
        q = _unpack_cols(words, AWQ, BITS, BLOCK_K, BLOCK_N // PACK)
    else:
        words_k = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        words = tl.load(qw_ptr + words_k[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(words_k * PACK < K)[:, None] & n_ok[None, :], other=0)
        q = _unpack_rows(words, BITS, BLOCK_K // PACK, BLOCK_N)
    if ACT_ORDER:  # any group per row: gather a row of zeros and scales for each k
        g = tl.load(g_ptr + offs_k, mask=offs_k < K, other=0)
        row_ok = (offs_k < K)[:, None]
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                    mask=row_ok & n_ok[None, :], other=0.0)
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + g[:, None] * stride_zg + words_n[None, :] * stride_zn,
                         mask=row_ok & wn_ok[None, :], other=0)
            z = _unpack_cols(zw, AWQ, BITS, BLOCK_K, BLOCK_N // PACK) + zero_offset
        else:
            z = zero_offset
    else:  # the tile lies inside group k0 // group_size: one row of zeros and scales
        g = k0 // group_size + tl.zeros((1,), dtype=tl.int32)
        row_ok = (g * group_size < K)[:, None]
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                    mask=row_ok & n_ok[None, :], other=0.0)
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + g[:, None] * stride_zg + words_n[None, :] * stride_zn,
                         mask=row_ok & wn_ok[None, :], other=0)
            z = _unpack_cols(zw, AWQ, BITS, 1, BLOCK_N // PACK) + zero_offset
        else:
            z = zero_offset
    return (_to_float(q) - z.to(tl.float32)) * s.to(tl.float32)


@triton.jit
def _dequant_words4(words, z, s, magic):
    """[C, R] 4-bit words packed along K, seen transposed (row c: column c of W) -> W^T's
    [C, 8 R] fp32 tile (q - z) s, k = 8 r + j. Each value is ``_code_at``'s one LOP3 and one
    FADD, then one FFMA with the column's s 2**-p and -z s ([C, 1]; no shift, no integer
    conversion, no separate zero subtraction)."""
    hi = words >> _hi_shift(4)
    c = -z * s
    w0 = _code_at(words, hi, magic, 0, 4) * (s * _code_scale(0, 4)) + c
    w1 = _code_at(words, hi, magic, 1, 4) * (s * _code_scale(1, 4)) + c
    w2 = _code_at(words, hi, magic, 2, 4) * (s * _code_scale(2, 4)) + c
    w3 = _code_at(words, hi, magic, 3, 4) * (s * _code_scale(3, 4)) + c
    w4 = _code_at(words, hi, magic, 4, 4) * (s * _code_scale(4, 4)) + c
    w5 = _code_at(words, hi, magic, 5, 4) * (s * _code_scale(5, 4)) + c
    w6 = _code_at(words, hi, magic, 6, 4) * (s * _code_scale(6, 4)) + c
    w7 = _code_at(words, hi, magic, 7, 4) * (s * _code_scale(7, 4)) + c
    # words are [C, R] (W^T's rows): [C, R, i0, i1, i2] holds value 4 i0 + 2 i1 + i2, so the
    # row-major reshape to [C, 8 R] is k order with no permutation
    both = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)),
                   tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    C: tl.constexpr = words.shape[0]
    R: tl.constexpr = words.shape[1]
    return tl.reshape(both, (C, 8 * R))


@triton.jit
def _group_rows(qz_ptr, s_ptr, g, g_ok, offs_n, n_ok, zero_offset, stride_zg, stride_zn,
                stride_sg, stride_sn, BITS: tl.constexpr, AWQ: tl.constexpr,
                HAS_ZEROS: tl.constexpr):
    """fp32 (zeros, scales) [R, BLOCK_N] of groups ``g`` [R] for columns ``offs_n`` (each
    column's zero word loaded directly: one row per K tile, so the repeats cost little)."""
    PACK: tl.constexpr = 32 // BITS
    ok = g_ok[:, None] & n_ok[None, :]
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=ok,
                other=0.0).to(tl.float32)
    if HAS_ZEROS:
        if AWQ:
            slot = (offs_n % 2) * 4 + (offs_n % 8) // 2
        else:
            slot = offs_n % PACK
        zw = tl.load(qz_ptr + g[:, None] * stride_zg + (offs_n // PACK)[None, :] * stride_zn,
                     mask=ok, other=0)
        z = ((zw >> (slot * BITS)[None, :]) & ((1 << BITS) - 1)) + zero_offset
    else:
        z = tl.zeros((1, 1), dtype=tl.int32) + zero_offset
    return z.to(tl.float32), s


@triton.jit
def _wna16_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, part_ptr, count_ptr,
                       bias_ptr, N, K, k_split, splits, half, zero_offset, magic,
                       stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                       stride_os, BITS: tl.constexpr, ACT_ORDER: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                       GATED: tl.constexpr, GROUP: tl.constexpr, EVEN: tl.constexpr,
                       X_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    # Weights packed along K (GPTQ, compressed-tensors): out[split, n] = sum over this
    # split's K range of x[k] W[k, n]. The [BLOCK_K / PACK, BLOCK_N] words are loaded once;
    # value j of every word (rows k = word_row * PACK + j) is one unrolled step. GROUP (the
    # group size) is a constant so that a tile's group is a multiply and shift, not an
    # integer division; EVEN (N a multiple of BLOCK_N, K of k_split): the loop's loads take
    # no per-element masks. Both cut the per-tile instructions that the products share.
    # USE_PDL (layers/pdl.py): the first tile of words is requested before waiting for the
    # kernel before (it writes x; the split counters are read in the fold, after the wait).
    PACK: tl.constexpr = 32 // BITS
    pdl.launch_dependents(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_K // PACK)
    acc = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_split
    k_end = tl.minimum(k_start + k_split, K)
    col_ptrs = qw_ptr + offs_n[None, :] * stride_qn
    words = tl.load(col_ptrs + (k_start // PACK + rows)[:, None] * stride_qk,
                    mask=((k_start // PACK + rows) * PACK < k_end)[:, None] & n_ok[None, :],
                    other=0, eviction_policy="evict_first")
    pdl.wait(USE_PDL)
    for k0 in range(k_start, k_start + k_split, BLOCK_K):
        word_rows = k0 // PACK + rows
        # the next tile's words are requested before this tile's products (H100, engine
        # batch-1 decode: 1.446x -> 1.465x bf16, within a run's noise; a load-only kernel
        # reads the same tiles at 0.93 of copy, so the products, not the loads, set the pace)
        next_rows = word_rows + BLOCK_K // PACK
        if EVEN:  # one condition for the whole tile: is there a next one in this split
            next_words = tl.load(col_ptrs + next_rows[:, None] * stride_qk,
                                 mask=k0 + BLOCK_K < k_end, other=0,
                                 eviction_policy="evict_first")
        else:
            next_words = tl.load(col_ptrs + next_rows[:, None] * stride_qk,
                                 mask=(next_rows * PACK < k_end)[:, None] & n_ok[None, :],
                                 other=0, eviction_policy="evict_first")
        if ACT_ORDER:  # each row its own group: zeros and scales per value
            for j in tl.static_range(PACK):
                k = word_rows * PACK + j
                xj = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + k, mask=k < K, other=0)
                z, s = _group_rows(qz_ptr, s_ptr, g, k < K, offs_n, n_ok, zero_offset,
                                   stride_zg, stride_zn, stride_sg, stride_sn, BITS, False,
                                   HAS_ZEROS)
                q = _to_float((words >> (j * BITS)) & ((1 << BITS) - 1))
                acc += (q - z) * s * xj[:, None]
        else:  # the tile lies in one group: sum_j (q - z) s x = s (sum_j q x - z sum_j x),
            # one FMA per weight, the zero and scale once per word
            g = k0 // GROUP + tl.zeros((1,), dtype=tl.int32)
            if EVEN:  # always-true masks, folded away
                g_ok, cols_ok = g >= 0, offs_n >= 0
            else:
                g_ok, cols_ok = g < (K + GROUP - 1) // GROUP, n_ok
            z, s = _group_rows(qz_ptr, s_ptr, g, g_ok, offs_n, cols_ok, zero_offset,
                               stride_zg, stride_zn, stride_sg, stride_sn, BITS, False,
                               HAS_ZEROS)
            qx = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_K // PACK,), dtype=tl.float32)
            hi_words = words >> _hi_shift(BITS)
            if X_PAIRS:  # bf16 x read as int32 pairs: half the loads, each value one
                # shift or mask from its fp32 bits
                for m in tl.static_range(PACK // 2):
                    k = word_rows * PACK + 2 * m
                    if EVEN:
                        pair = tl.load(x_ptr + k // 2)
                    else:
                        pair = tl.load(x_ptr + k // 2, mask=k < K, other=0)
                    x_lo = (pair << 16).to(tl.float32, bitcast=True)
                    x_hi = (pair & -65536).to(tl.float32, bitcast=True)
                    qx = _add_value(qx, words, hi_words, magic, x_lo, 2 * m, BITS)
                    qx = _add_value(qx, words, hi_words, magic, x_hi, 2 * m + 1, BITS)
                    x_sum += x_lo + x_hi
            else:
                for j in tl.static_range(PACK):
                    k = word_rows * PACK + j
                    if EVEN:
                        xj = tl.load(x_ptr + k).to(tl.float32)
                    else:
                        xj = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                    qx = _add_value(qx, words, hi_words, magic, xj, j, BITS)
                    x_sum += xj
            acc += (qx - z * x_sum[:, None]) * s
        words = next_words
    _store_split(tl.sum(acc, axis=0), out_ptr, part_ptr, count_ptr, bias_ptr, pid_n, pid_s,
                 offs_n, n_ok, N, splits, half, stride_os, FOLD, HAS_BIAS, GATED, BLOCK_N)


@triton.jit
def _store_split(sums, out_ptr, part_ptr, count_ptr, bias_ptr, pid_n, pid_s, offs_n, n_ok, N,
                 splits, half, stride_os, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    """A split-K GEMV program's column sums: FOLD, into ``part`` (the last of the column
    tile's splits, gate and up together when GATED, folds them with the epilogue into
    ``out``); else straight into ``out``'s row ``pid_s``."""
    if FOLD:
        tl.store(part_ptr + pid_s * stride_os + offs_n, sums, mask=n_ok)
        if GATED:
            tile = pid_n % (half // BLOCK_N)
        else:
            tile = pid_n
        if _last_arrival(count_ptr + tile, splits * (2 if GATED else 1)):
            _fold_splits(part_ptr, bias_ptr, out_ptr, tile * BLOCK_N, splits, half,
                         stride_os, half if GATED else N, HAS_BIAS, GATED, BLOCK_N)
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch
    else:
        tl.store(out_ptr + pid_s * stride_os + offs_n, sums.to(out_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.jit
def _fold_splits(part_ptr, bias_ptr, out_ptr, n0, splits, half, stride_ps, n_out,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    """out[n0:n0+BLOCK] = epilogue(sum over splits of part[s, n]): + bias, then, GATED,
    silu(gate) * up with the up column ``half`` to the right. The loads bypass L1 (.cg):
    when the GEMV folds, other programs of the same launch wrote them."""
    offs = n0 + tl.arange(0, BLOCK)
    ok = offs < n_out
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=ok, other=0.0,
                       cache_modifier=".cg")
        if GATED:
            acc_up += tl.load(part_ptr + s * stride_ps + half + offs, mask=ok, other=0.0,
                              cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if GATED:
            acc_up += tl.load(bias_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _wna16_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, M, N, K, k_split,
                       group_size, zero_offset, magic, stride_xm, stride_om, stride_os,
                       stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
                       BITS: tl.constexpr, AWQ: tl.constexpr, ACT_ORDER: tl.constexpr,
                       HAS_ZEROS: tl.constexpr, IEEE: tl.constexpr, SWAP: tl.constexpr,
                       FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # out[split, m, n] = x[m, split's K range] @ W[split's K range, n]; SWAP: accumulated as
    # W^T x^T (``GEMM_SWAP``); FAST (SWAP, 4-bit K-packed, a tile in one group): the words
    # are loaded as W^T's [BLOCK_N, BLOCK_K / 8] and decoded in place (``_dequant_words4``)
    pid_n = tl.program_id(0)  # neighbouring programs share the x rows
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_s * k_split
    for k0 in range(k_start, k_start + k_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if FAST:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            words_k = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + words_k[None, :] * stride_qk
                            + offs_n[:, None] * stride_qn,
                            mask=(words_k * 8 < K)[None, :] & (offs_n < N)[:, None], other=0)
            g = k0 // group_size + tl.zeros((1,), dtype=tl.int32)
            z, s = _group_rows(qz_ptr, s_ptr, g, g * group_size < K, offs_n, offs_n < N,
                               zero_offset, stride_zg, stride_zn, stride_sg, stride_sn, 4,
                               False, HAS_ZEROS)
            w_t = _dequant_words4(words, tl.trans(z), tl.trans(s), magic)
        else:
            w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, n0, N, K, group_size,
                              zero_offset, stride_qk, stride_qn, stride_zg, stride_zn,
                              stride_sg, stride_sn, BITS, AWQ, ACT_ORDER, HAS_ZEROS, BLOCK_K,
                              BLOCK_N)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k < K)[None, :], other=0.0)
        if FAST:
            acc_t += tl.dot(w_t.to(x.dtype), tl.trans(x))
        elif SWAP:
            acc_t += tl.dot(tl.trans(w.to(x.dtype)), tl.trans(x))
        elif IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if SWAP:
        acc = tl.trans(acc_t)
    tl.store(out_ptr + pid_s * stride_os + offs_m[:, None].to(tl.int64) * stride_om
             + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n < N)[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr, N, K, group_size, zero_offset,
                    stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, stride_o,
                    BITS: tl.constexpr, AWQ: tl.constexpr, ACT_ORDER: tl.constexpr,
                    HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # W[k0:k0+BLOCK_K, n0:n0+BLOCK_N] in the output dtype (large batches: cuBLAS after)
    k0 = tl.program_id(0) * BLOCK_K
    n0 = tl.program_id(1) * BLOCK_N
    w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, g_ptr, k0, n0, N, K, group_size, zero_offset,
                      stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn, BITS,
                      AWQ, ACT_ORDER, HAS_ZEROS, BLOCK_K, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * stride_o + offs_n[None, :],
             w.to(out_ptr.dtype.element_ty), mask=(offs_k < K)[:, None] & (offs_n < N)[None, :])


@dataclass
class WNA16Weight:
    """A quantized [K, N] weight as the kernels read it (module docstring): strided views of
    the checkpoint's tensors. ``qzeros`` None: the constant zero ``zero_offset``. ``g_idx``
    None: row k is in group k // group_size."""
    qweight: torch.Tensor
    qzeros: torch.Tensor | None
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    awq: bool
    group_size: int
    zero_offset: int
    k: int
    n: int


def gptq_weight(qweight, qzeros, scales, g_idx, bits: int, group_size: int, desc_act: bool,
                zero_offset: int) -> WNA16Weight:
    """GPTQ: qweight [K/pack, N], qzeros [G, N/pack], scales [G, N], g_idx [K]."""
    k = qweight.shape[0] * (32 // bits)
    return WNA16Weight(qweight, qzeros, scales, g_idx if desc_act else None, bits, False,
                       group_size if group_size > 0 else k, zero_offset, k, scales.shape[1])


def awq_weight(qweight, qzeros, scales, group_size: int) -> WNA16Weight:
    """AWQ GEMM layout as stored: qweight [K, N/8], qzeros [G, N/8] (interleaved), scales
    [G, N]. Only the GEMM kernel reads it (one-row inputs too): ``repack_awq`` gives the
    K-packed layout that the GEMV reads with 16-byte loads."""
    return WNA16Weight(qweight, qzeros, scales, None, 4, True, group_size, 0,
                       qweight.shape[0], scales.shape[1])


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """AWQ (qweight [K, N/8], qzeros [G, N/8], interleaved) -> GPTQ's layout (qweight
    [K/8, N] packed along K, qzeros [G, N/8] in natural order, zero offset 0): the same
    weight, read by every kernel here (``gptq_weight(..., zero_offset=0)``)."""
    from pagedllm.quant.packing import AWQ_ORDER, pack_int32, unpack_int32
    codes = unpack_int32(qweight, 4, 1, AWQ_ORDER)                   # [K, N]
    zeros = unpack_int32(qzeros, 4, 1, AWQ_ORDER)                    # [G, N]
    return pack_int32(codes, 4, 0), pack_int32(zeros, 4, 1)


def compressed_weight(weight_packed, weight_scale, zero_point, g_idx, bits: int,
                      group_size: int | None) -> WNA16Weight:
    """compressed-tensors pack-quantized: weight_packed [N, K/pack] (codes q + 2**(bits-1)),
    weight_scale [N, G], zero_point [N/pack, G] (stored zp + 2**(bits-1)) or None."""
    k = weight_packed.shape[1] * (32 // bits)
    zeros = zero_point.t() if zero_point is not None else None
    offset = 0 if zero_point is not None else 1 << (bits - 1)
    return WNA16Weight(weight_packed.t(), zeros, weight_scale.t(), g_idx, bits, False,
                       group_size or k, offset, k, weight_packed.shape[0])


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter (tests cap the split size to exercise the partial sums)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _block_k(w: WNA16Weight, want: int) -> tuple[int, bool]:
    """(BLOCK_K, act-order path): a K tile must lie in one group unless rows are gathered."""
    pack = 32 // w.bits
    block_k = max(min(want, triton.next_power_of_2(w.k)), pack)
    if w.g_idx is not None:
        return block_k, True
    while block_k > pack and w.group_size % block_k:
        block_k //= 2
    return block_k, w.group_size % block_k != 0


def _row_groups(w: WNA16Weight) -> torch.Tensor:
    """g_idx for a group size no tile divides (rows gathered one by one)."""
    if w.g_idx is None:
        w.g_idx = (torch.arange(w.k, device=w.qweight.device) // w.group_size).int()
    return w.g_idx


def _launch_args(w: WNA16Weight, act_order: bool) -> tuple:
    zeros = w.qzeros if w.qzeros is not None else w.scales
    g_idx = _row_groups(w) if act_order else w.scales
    return (w.qweight, zeros, w.scales, g_idx), (
        w.qweight.stride(0), w.qweight.stride(1), zeros.stride(0), zeros.stride(1),
        w.scales.stride(0), w.scales.stride(1))


def _splits(programs: int, k: int, block_k: int, target: int,
            rows: int = 1, per_row: int | None = None) -> tuple[int, int]:
    """(splits, K per split) so that about ``target`` programs run (split-K: the SMs fill
    even when N gives few column tiles); each split a whole number of K tiles. The fp32
    partial sums (written and read once more) stay small next to the weight: a split covers
    at least max(SPLIT_MIN_K, ``per_row`` (default SPLIT_K_PER_ROW) * rows) of K."""
    k_tiles = triton.cdiv(k, block_k)
    most = max(1, k // max(SPLIT_MIN_K, (per_row or SPLIT_K_PER_ROW) * rows))
    splits = max(1, min(k_tiles, triton.cdiv(target, programs), most))
    k_split = triton.cdiv(k_tiles, splits) * block_k
    return triton.cdiv(k, k_split), k_split


def _gemv(x: torch.Tensor, w: WNA16Weight, config: tuple | None,
          bias: torch.Tensor | None = None, gated: bool = False) -> tuple[torch.Tensor, str]:
    """``config``: (BLOCK_N, BLOCK_K, num_warps[, programs per SM aimed for by split-K]).
    Returns (out, stage): "final" when the kernel folded the splits with the epilogue
    (``_fold_splits``: no reduce launch), "partial" for split-K sums still to reduce, "raw"
    for the product without the epilogue."""
    block_n, block_k, warps, *rest = config or GEMV_CONFIG
    waves = rest[0] if rest else GEMV_WAVES
    block_k, act_order = _block_k(w, block_k)
    if w.awq:  # AWQ's own layout has no GEMV (``repack_awq`` makes it K-packed): GEMM
        out, partial = _gemm(x, w, None)
        return out, "partial" if partial else "raw"
    n_tiles = triton.cdiv(w.n, block_n)
    splits, k_split = _splits(n_tiles, w.k, block_k, waves * _sm_count(x.device))
    fold = (switches().decode_fold and (splits > 1 or gated)
            and (not gated or (w.n // 2) % block_n == 0))
    tensors, strides = _launch_args(w, act_order)
    if fold:
        out = torch.empty(1, w.n // 2 if gated else w.n, device=x.device, dtype=x.dtype)
        part = torch.empty(splits, w.n, device=x.device, dtype=torch.float32)
        counts = _split_counters(n_tiles, x.device)  # the decode kernels' tickets
    else:
        out = part = counts = torch.empty(splits, w.n, device=x.device,
                                          dtype=x.dtype if splits == 1 else torch.float32)
    x_pairs = (x.dtype == torch.bfloat16 and not act_order and x.is_contiguous()
               and x.data_ptr() % 4 == 0)  # int32 loads: 4-byte aligned
    _wna16_gemv_kernel[(n_tiles, splits)](
        x.view(torch.int32) if x_pairs else x, *tensors, out, part, counts,
        bias if bias is not None else part, w.n, w.k, k_split, splits, w.n // 2,
        w.zero_offset, MAGIC, *strides, part.stride(0),
        BITS=w.bits, ACT_ORDER=act_order, HAS_ZEROS=w.qzeros is not None, FOLD=fold,
        HAS_BIAS=bias is not None, GATED=gated, GROUP=1 if act_order else w.group_size,
        EVEN=not act_order and w.n % block_n == 0 and w.k % k_split == 0, X_PAIRS=x_pairs,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, **pdl.options(x))
    if fold:
        return out, "final"
    return (out, "raw") if splits == 1 else (out.unsqueeze(1), "partial")


SPLIT_MIN_K, SPLIT_K_PER_ROW = 512, 64
# 2**23's bits, passed as an argument: a constant would be folded into a separate OR (one
# LOP3 more per weight); from a register, mask and OR are one LOP3 (``_code_at``)
MAGIC = 0x4B000000
# GEMV (BLOCK_N, BLOCK_K, num_warps), and the programs it aims for per SM (split-K)
GEMV_CONFIG = (64, 128, 4)
GEMV_WAVES = 8
# the GEMM up to 64 rows (fp16 / bf16 x) as out^T = W^T x^T: the dequantized tile is the
# wgmma's register operand (no shared-memory round trip), 4-bit K-packed tiles without
# act-order decoded in place (``_dequant_words4``). sm_90 SASS of the (16, 64, 128, 4)
# loop: 677 -> 523 instructions per thread per tile (64 weights); H100, Llama-3-8B
# projections at 16 rows: 1.37-1.68x bf16 against 0.97-1.07x (quant_bench --gemm-swap 0|1)
GEMM_SWAP = True
# the largest BLOCK_M (x rows of a tile: the wgmma's N when swapped) that takes the swap, up
# to GEMM_SPLIT_MAX_ROWS rows (the memory-bound batches; prefill keeps tl.dot(x, w))
SWAP_MAX_BLOCK_M = 64
# (max rows, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, split-K programs per SM])
# for the GEMM, first match; batches up to 64 rows are memory-bound: split-K fills the SMs
# when the tiles are few. Up to 16 rows: the best of the H100 sweep on the Llama-3-8B
# projections (quant_bench --tune, 2026-12-07: 11-13% faster than (16, 32, 128, 4, 3, 2))
GEMM_CONFIGS = [(16, 16, 64, 128, 4, 3, 4), (32, 32, 32, 128, 4, 3), (64, 64, 64, 64, 4, 3),
                (1 << 62, 64, 128, 64, 8, 3)]
GEMM_SPLIT_MAX_ROWS = 64
GEMM_WAVES = 2


def _gemm(x: torch.Tensor, w: WNA16Weight, config: tuple | None) -> torch.Tensor:
    """``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, programs per SM
    aimed for by split-K[, least inputs a split takes per row]])."""
    m = x.shape[0]
    if config is None:
        config = next(c[1:] for c in GEMM_CONFIGS if m <= c[0])
    block_m, block_n, block_k, warps, stages, *rest = config
    waves = rest[0] if rest else GEMM_WAVES
    block_k, act_order = _block_k(w, block_k)
    tiles = triton.cdiv(w.n, block_n) * triton.cdiv(m, block_m)
    target = waves * _sm_count(x.device) if m <= GEMM_SPLIT_MAX_ROWS else 0
    per_row = rest[1] if len(rest) > 1 else None
    splits, k_split = _splits(tiles, w.k, block_k, target, m, per_row)
    out = torch.empty(splits, m, w.n, device=x.device,
                      dtype=x.dtype if splits == 1 else torch.float32)
    tensors, strides = _launch_args(w, act_order)
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(m, block_m), splits)
    swap = (GEMM_SWAP and x.dtype != torch.float32 and block_m <= SWAP_MAX_BLOCK_M
            and m <= GEMM_SPLIT_MAX_ROWS)
    _wna16_gemm_kernel[grid](
        x, *tensors, out, m, w.n, w.k, k_split, w.group_size, w.zero_offset, MAGIC,
        x.stride(0), out.stride(1), out.stride(0), *strides, BITS=w.bits, AWQ=w.awq,
        ACT_ORDER=act_order, HAS_ZEROS=w.qzeros is not None, IEEE=x.dtype == torch.float32,
        SWAP=swap, FAST=swap and w.bits == 4 and not w.awq and not act_order,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return (out[0], False) if splits == 1 else (out, True)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, splits, n_out, half, stride_ps,
                          stride_pm, stride_om, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                          BLOCK: tl.constexpr):
    # out[m, n] = epilogue(sum over splits of part[s, m, n]) (``_fold_splits``, row m)
    m = tl.program_id(0).to(tl.int64)
    _fold_splits(part_ptr + m * stride_pm, bias_ptr, out_ptr + m * stride_om,
                 tl.program_id(1) * BLOCK, splits, half, stride_ps, n_out, HAS_BIAS, GATED,
                 BLOCK)


def _reduce(part: torch.Tensor, bias: torch.Tensor | None, gated: bool,
            dtype: torch.dtype) -> torch.Tensor:
    """The split-K partial sums [S, M, N] (fp32) -> [M, N or N/2] with the epilogue, in one
    launch (instead of sum, cast, bias add and the gated SiLU)."""
    _, m, n = part.shape
    n_out = n // 2 if gated else n
    out = torch.empty(m, n_out, dtype=dtype, device=part.device)
    block = min(1024, triton.next_power_of_2(n_out))
    _splitk_reduce_kernel[(m, triton.cdiv(n_out, block))](
        part, bias if bias is not None else part, out, part.shape[0], n_out, n_out,
        part.stride(0), part.stride(1), out.stride(0), HAS_BIAS=bias is not None,
        GATED=gated, BLOCK=block, num_warps=4)
    return out


def _epilogue(out: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    if bias is not None:
        out = out + bias
    if gated:
        from pagedllm.layers import fused
        out = fused.silu_and_mul(out)
    return out


# rows from which the weight is dequantized once (one kernel) and multiplied by cuBLAS: the
# fused GEMM would dequantize every tile once per BLOCK_M rows (prefill)
DEQUANT_MIN_ROWS = 512


def dequantize(w: WNA16Weight, dtype: torch.dtype) -> torch.Tensor:
    """The [K, N] weight in ``dtype``, one launch."""
    block_k, act_order = _block_k(w, 64)
    out = torch.empty(w.k, w.n, dtype=dtype, device=w.qweight.device)
    tensors, strides = _launch_args(w, act_order)
    _dequant_kernel[(triton.cdiv(w.k, block_k), triton.cdiv(w.n, 64))](
        *tensors, out, w.n, w.k, w.group_size, w.zero_offset, *strides, out.stride(0),
        BITS=w.bits, AWQ=w.awq, ACT_ORDER=act_order, HAS_ZEROS=w.qzeros is not None,
        BLOCK_K=block_k, BLOCK_N=64, num_warps=4)
    return out


def wna16_matmul(x: torch.Tensor, w: WNA16Weight, *, bias: torch.Tensor | None = None,
                 gated: bool = False, gemv: bool | None = None,
                 config: tuple | None = None) -> torch.Tensor:
    """x [..., K] @ W [K, N] (+ bias) -> [..., N] in x's dtype; ``gated``: then
    silu(first half) * second half -> [..., N/2]. One row: the split-K GEMV (``gemv`` forces
    either kernel; ``config`` overrides the tile choice, for tuning); up to
    ``DEQUANT_MIN_ROWS`` rows the fused GEMM; more: dequantize once, then cuBLAS. Split-K
    partial sums are reduced with the epilogue in one launch."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[1] != w.k:
        raise ValueError(f"wna16_matmul: x has {x2.shape[1]} features, the weight {w.k}")
    n_out = w.n // 2 if gated else w.n
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], n_out)
    use_gemv = x2.shape[0] == 1 if gemv is None else gemv
    if x2.shape[0] >= DEQUANT_MIN_ROWS and config is None:
        out, stage = torch.matmul(x2, dequantize(w, x2.dtype)), "raw"
    elif use_gemv and x2.shape[0] == 1:
        out, stage = _gemv(x2, w, config, bias, gated)
    else:
        out, partial = _gemm(x2, w, config)
        stage = "partial" if partial else "raw"
    if stage == "partial":
        out = _reduce(out, bias, gated, x.dtype)
    elif stage == "raw":
        out = _epilogue(out, bias, gated)
    return out.reshape(*shape[:-1], n_out)
