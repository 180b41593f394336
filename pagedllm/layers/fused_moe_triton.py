"""Fused mixture-of-experts on CUDA: the routed experts of a layer in three Triton launches
(plus one reduction), with no host sync and shapes fixed by the token count, so a CUDA graph
captures it.

1. ``_align_kernel`` (one program; prefill-sized batches use device-wide torch ops
   instead): the T*k (token, slot) pairs sorted by expert, each
   expert's run padded to a multiple of ``BLOCK_M`` rows so that a row block holds one
   expert: ``sorted_ids`` (pair index ``t * k + j``, or the sentinel T*k in padding),
   ``block_expert`` (expert of each row block, -1 past the end) and ``num_padded`` (rows in
   use). Counting and ranking are a one-hot matrix per chunk of pairs with a running
   cumulative sum: deterministic, no atomics, stable (pairs of one expert keep their order).
2. ``_moe_gemm_kernel`` with ``GATED``: per (row block, column tile) it gathers the block's
   token rows of x, multiplies them by the block's expert's gate rows and up rows (two
   accumulators over the same A tile) and stores silu(gate) * up: [T*k, I] in x's dtype.
3. ``_moe_gemm_kernel`` with ``WEIGHTED``: the down projection of those rows, times each
   pair's routing weight: [T*k, H].
4. The sum over each token's k rows (torch; fp32 accumulation inside ``sum``).

Decode-sized batches (up to ``MOE_GEMV_MAX_TOKENS`` tokens) skip the sort: two launches of
``_moe_gemv_kernel``, a program per (column tile, token) that gathers the rows of the token's
k experts into one tile (gate/up with SiLU * up fused; then down with the routing weights and
the top-k sum fused, fp32), so the align kernel and the sum kernel are gone too.

``route_topk`` is the router in one launch (softmax or sigmoid scores, DeepSeek's correction
bias and grouped top-k, top-k, renormalisation, scaling), instead of the five to fifteen
small torch kernels of ``select_experts`` per layer and step.

Programs past ``num_padded`` return at once; the grid is sized for the worst case
``T*k + min(T*k, E) * (BLOCK_M - 1)`` rows, known from T on the host. Tile sizes come from a
small table by tokens per expert (``moe_config``); ``benchmarks/moe_bench.py --tune`` sweeps
the candidates on a GPU. The torch loop of ``layers/moe.py`` (``moe_reference``) is the
oracle (tests/kernels/test_fused_moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagedllm.layers import pdl


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, n, max_rows,
                  num_blocks, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr,
                  CHUNK: tl.constexpr):
    experts = tl.arange(0, E_POW2)
    lane = tl.arange(0, CHUNK)
    for start in range(0, max_rows, CHUNK):  # padding rows point at the sentinel n
        tl.store(sorted_ptr + start + lane, n + lane * 0, mask=start + lane < max_rows)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for start in range(0, n, CHUNK):
        e = tl.load(ids_ptr + start + lane, mask=start + lane < n, other=E_POW2).to(tl.int32)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    for start in range(0, num_blocks, CHUNK):
        row = (start + lane) * BLOCK_M
        # a block's expert: how many experts' padded runs end at or before its first row
        expert = tl.sum((row[:, None] >= ends[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + start + lane, tl.where(row < total, expert, -1),
                 mask=start + lane < num_blocks)
    tl.debug_barrier()  # the sentinel stores above land before the scatter below
    seen = tl.zeros((E_POW2,), dtype=tl.int32)
    for start in range(0, n, CHUNK):
        pair = start + lane
        e = tl.load(ids_ptr + pair, mask=pair < n, other=E_POW2).to(tl.int32)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        slot = tl.cumsum(onehot, axis=0) - 1 + seen[None, :] + starts[None, :]
        dest = tl.sum(onehot * slot, axis=1)
        tl.store(sorted_ptr + dest, pair, mask=pair < n)
        seen += tl.sum(onehot, axis=0)


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                     num_padded_ptr, topw_ptr, N, K, n_pairs, stride_am, stride_we, stride_wn,
                     stride_se, stride_om, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
                     WEIGHTED: tl.constexpr, SCALED: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # axis 0: column tiles (neighbouring programs share the A rows and the expert). SCALED:
    # W holds int8 / fp8 codes with a scale per row (s [E, rows] fp32): each tile is cast to
    # a's dtype (exact) and the fp32 sums take the rows' scales before the epilogue
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < n_pairs
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    # W[e] is [rows, K] row-major: the [BLOCK_K, BLOCK_N] tile of W^T
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn \
        + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALED:  # exact in a's dtype (through fp32: the interpreter's direct cast is not)
            w = w.to(tl.float32).to(a.dtype)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:  # the up rows sit N rows below the gate rows
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & n_ok[None, :],
                           other=0.0)
            if SCALED:
                w_up = w_up.to(tl.float32).to(a.dtype)
            if IEEE:
                acc_up += tl.dot(a, w_up, input_precision="ieee")
            else:
                acc_up += tl.dot(a, w_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALED:
        s_rows = s_ptr + expert * stride_se + offs_n
        acc *= tl.load(s_rows, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(s_rows + N, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc *= tl.load(topw_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_gemv_kernel(a_ptr, w_ptr, s_ptr, out_ptr, ids_ptr, topw_ptr, N, K, stride_am,
                     stride_we, stride_wn, stride_se, stride_om, logits_ptr, bias_ptr, E,
                     stride_l, group_size, scale, TOP_K: tl.constexpr,
                     K_POW2: tl.constexpr, GATED: tl.constexpr, SCALED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                     ROUTED: tl.constexpr, RENORM: tl.constexpr, E_POW2: tl.constexpr,
                     SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr,
                     TOPK_GROUP: tl.constexpr, BY_TOP2: tl.constexpr,
                     USE_PDL: tl.constexpr):
    # program (column tile, token): rows [n0, n0 + BLOCK_N) of each of the token's TOP_K
    # experts at once, R = K_POW2 * BLOCK_N gathered weight rows (row r: slot r // BLOCK_N),
    # walked along K in [R, BLOCK_K / VEC, VEC] tiles of 16-byte vectors, fp32 sums per
    # vector. GATED (gate/up): a is x [T, K], every row multiplies the token's x, out[pair, n]
    # = silu(gate) * up with the up rows N rows below. Else (down): a is the activations
    # [T * TOP_K, K], row r multiplies its pair's, out[t, n] = sum over slots of the routing
    # weight times the row's sum (the top-k sum fused, fp32). SCALED: int8 / fp8 codes, a
    # row's sum times its scale (s [E, rows] fp32). ROUTED (gate/up only): every program
    # routes the token itself from its router logits [T, E] (``_topk_route``, the routing
    # constexprs as ``_route_kernel``'s) and the first column tile stores the weights (times
    # ``scale``) and ids for the down launch, which saves ``route_topk``'s launch. USE_PDL
    # (layers/pdl.py): launched while the kernel before runs; every load waits for it (the
    # rows follow the routing).
    R: tl.constexpr = K_POW2 * BLOCK_N
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)
    t = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, R)
    slot = r // BLOCK_N
    n = tl.program_id(0) * BLOCK_N + r % BLOCK_N
    row_ok = (n < N) & (slot < TOP_K)
    pair = t * TOP_K + slot
    if ROUTED:
        offs_e = tl.arange(0, E_POW2)
        logits = tl.load(logits_ptr + t * stride_l + offs_e, mask=offs_e < E,
                         other=float("-inf")).to(tl.float32)
        top_w, top_ids = _topk_route(logits, bias_ptr, E, group_size, TOP_K, K_POW2, RENORM,
                                     E_POW2, SIGMOID, HAS_BIAS, GROUPS, TOPK_GROUP, BY_TOP2,
                                     PACKED=True)
        slots = tl.arange(0, K_POW2)
        if tl.program_id(0) == 0:
            tl.store(topw_ptr + t * TOP_K + slots, top_w * scale, mask=slots < TOP_K)
            tl.store(ids_ptr + t * TOP_K + slots, top_ids.to(tl.int64), mask=slots < TOP_K)
        expert = tl.sum(tl.where(slot[:, None] == slots[None, :], top_ids[None, :], 0),
                        1).to(tl.int64)
    else:
        expert = tl.load(ids_ptr + pair, mask=slot < TOP_K, other=0).to(tl.int64)
    w_rows = (w_ptr + expert * stride_we + n.to(tl.int64) * stride_wn)[:, None, None]
    cols = (tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :])[None]
    if GATED:
        a_rows = a_ptr + t * stride_am + tl.zeros((1, 1, 1), dtype=tl.int64)
        a_ok = tl.full((1, 1, 1), True, tl.int1)
    else:
        a_rows = (a_ptr + pair * stride_am)[:, None, None]
        a_ok = (slot < TOP_K)[:, None, None]
    acc = tl.zeros((R, BLOCK_K // VEC), dtype=tl.float32)
    acc_up = tl.zeros((R, BLOCK_K // VEC), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        mask = row_ok[:, None, None] & (kk < K)
        a = tl.load(a_rows + kk, mask=a_ok & (kk < K), other=0.0).to(tl.float32)
        w = tl.load(w_rows + kk, mask=mask, other=0.0, eviction_policy="evict_first")
        acc += tl.sum(w.to(tl.float32) * a, 2)
        if GATED:
            u = tl.load(w_rows + N * stride_wn + kk, mask=mask, other=0.0,
                        eviction_policy="evict_first")
            acc_up += tl.sum(u.to(tl.float32) * a, 2)
    out = tl.sum(acc, 1)
    up = tl.sum(acc_up, 1)
    if SCALED:
        s_rows = s_ptr + expert * stride_se + n
        out *= tl.load(s_rows, mask=row_ok, other=0.0)
        if GATED:
            up *= tl.load(s_rows + N, mask=row_ok, other=0.0)
    if GATED:
        out = out / (1.0 + tl.exp(-out)) * up
        tl.store(out_ptr + pair * stride_om + n, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok)
    else:
        out *= tl.load(topw_ptr + pair, mask=slot < TOP_K, other=0.0).to(tl.float32)
        out = tl.sum(tl.reshape(out, (K_POW2, BLOCK_N)), 0)
        cols_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + t * stride_om + cols_n, out.to(out_ptr.dtype.element_ty),
                 mask=cols_n < N)


@triton.jit
def _argmax_first(v, offs, NONE: tl.constexpr):
    """(max of v, the lowest offset holding it): torch.topk's order for distinct values."""
    best = tl.max(v, axis=0)
    return best, tl.min(tl.where(v == best, offs, NONE), axis=0)


@triton.jit
def _group_keep(choice, group, E_POW2: tl.constexpr, GROUPS: tl.constexpr,
                TOPK_GROUP: tl.constexpr, BY_TOP2: tl.constexpr):
    """[E_POW2] bool: the experts of the TOPK_GROUP best of GROUPS groups (``group``: each
    expert's group, GROUPS past the end). A group scores its best choice value, or with
    BY_TOP2 the sum of its best two (DeepSeek-V3); ties go to the lower group."""
    offs = tl.arange(0, E_POW2)
    gidx = tl.arange(0, GROUPS)
    scores = tl.zeros((GROUPS,), dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        mine = tl.where(group == g, choice, float("-inf"))
        top, at = _argmax_first(mine, offs, E_POW2)
        if BY_TOP2:
            top += tl.max(tl.where(offs == at, float("-inf"), mine), axis=0)
        scores = tl.where(gidx == g, top, scores)
    keep = tl.zeros((E_POW2,), dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        _, g_best = _argmax_first(scores, gidx, GROUPS)
        keep = keep | (group == g_best)
        scores = tl.where(gidx == g_best, float("-inf"), scores)
    return keep


@triton.jit
def _topk_route(x, bias_ptr, E, group_size, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                RENORM: tl.constexpr, E_POW2: tl.constexpr, SIGMOID: tl.constexpr,
                HAS_BIAS: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
                BY_TOP2: tl.constexpr, PACKED: tl.constexpr = False):
    """(weights [K_POW2] fp32, ids [K_POW2] int32) of one token from its logits x [E_POW2]
    (fp32, -inf past E): scores (softmax or sigmoid); the choice values (scores + the
    correction bias); with GROUPS > 1 only the TOPK_GROUP best groups' experts compete; the
    TOP_K largest choices in descending order (ties: the lowest expert id), weighted by their
    unbiased scores, optionally renormalised (slots past TOP_K: weight 0, expert 0).
    PACKED: each round is one max over int64 keys (the choice's order-preserving bits, then
    the expert id reversed, so ties go to the lower id) instead of a max, a min and a sum,
    and the weights are gathered once after the rounds: fewer block-wide reductions where
    many warps hold the experts (the experts' gate/up launch)."""
    offs = tl.arange(0, E_POW2)
    valid = offs < E
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.exp(x - tl.max(x, axis=0))
        p = p / tl.sum(p, axis=0)
    choice = p
    if HAS_BIAS:
        choice += tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUPS > 1:
        group = tl.where(valid, offs // group_size, GROUPS)
        keep = _group_keep(choice, group, E_POW2, GROUPS, TOPK_GROUP, BY_TOP2)
        choice = tl.where(keep, choice, float("-inf"))
    slots = tl.arange(0, K_POW2)
    weights = tl.zeros((K_POW2,), dtype=tl.float32)
    ids = tl.zeros((K_POW2,), dtype=tl.int32)
    if PACKED:
        bits = choice.to(tl.int32, bitcast=True)
        order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)  # signed order of floats
        key = (order << 32) | (E_POW2 - 1 - offs).to(tl.int64)
        for j in tl.static_range(TOP_K):
            idx = (E_POW2 - 1 - (tl.max(key, axis=0) & 0xFFFFFFFF)).to(tl.int32)
            ids = tl.where(slots == j, tl.where(idx < E, idx, 0), ids)
            key = tl.where(offs == idx, -9223372036854775807 - 1, key)
        weights = tl.sum(tl.where(offs[None, :] == ids[:, None], p[None, :], 0.0), axis=1)
        weights = tl.where(slots < TOP_K, weights, 0.0)
    else:
        for j in tl.static_range(TOP_K):
            _, idx = _argmax_first(choice, offs, E_POW2)
            weights = tl.where(slots == j, tl.sum(tl.where(offs == idx, p, 0.0), axis=0),
                               weights)
            ids = tl.where(slots == j, tl.where(idx < E, idx, 0), ids)  # NaN logits: expert
            choice = tl.where(offs == idx, float("-inf"), choice)  # 0, never past the experts
    if RENORM:
        weights = weights / tl.sum(weights, axis=0)
    return weights, ids


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, E, stride_l, group_size, scale,
                  TOP_K: tl.constexpr, K_POW2: tl.constexpr, RENORM: tl.constexpr,
                  E_POW2: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, BY_TOP2: tl.constexpr,
                  USE_PDL: tl.constexpr):
    # one token's routing (``_topk_route``), times ``scale``
    pdl.launch_dependents(USE_PDL)
    pdl.wait(USE_PDL)  # the logits come from the router projection
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_POW2)
    x = tl.load(logits_ptr + t * stride_l + offs, mask=offs < E, other=float("-inf"))
    weights, ids = _topk_route(x.to(tl.float32), bias_ptr, E, group_size, TOP_K, K_POW2,
                               RENORM, E_POW2, SIGMOID, HAS_BIAS, GROUPS, TOPK_GROUP, BY_TOP2)
    slots = tl.arange(0, K_POW2)
    tl.store(w_ptr + t * TOP_K + slots, weights * scale, mask=slots < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slots, ids.to(tl.int64), mask=slots < TOP_K)


@triton.jit
def _norm_router_kernel(x_ptr, res_ptr, norm_w_ptr, w_ptr, sum_ptr, xn_ptr, logits_ptr, E, H,
                        eps, offset, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                        USE_PDL: tl.constexpr):
    # one token: the post-attention residual add and RMSNorm (``_rms_norm_kernel``'s rounding:
    # the sum in x's dtype, fp32 statistics, the result in x's dtype), done by every program
    # on its own copy of the row, then BLOCK_E router logits (fp32 sums rounded to x's dtype,
    # as the router GEMV rounds them); the first program stores the new residual and the
    # normalised row for the experts. The router and norm weights are loaded before waiting
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    pdl.launch_dependents(USE_PDL)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * H + cols[None, :],
                mask=(rows < E)[:, None] & col_ok[None, :], other=0.0)
    norm_w = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    pdl.wait(USE_PDL)  # x comes from the attention's output projection
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
    x = (x.to(tl.float32) + tl.load(res_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
         ).to(x.dtype)
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, 0) / H + eps)
    xn = (h * inv * norm_w).to(x.dtype)
    logits = tl.sum(w.to(tl.float32) * xn.to(tl.float32)[None, :], 1)
    tl.store(logits_ptr + rows, logits.to(x.dtype).to(logits_ptr.dtype.element_ty),
             mask=rows < E)
    if tl.program_id(0) == 0:
        tl.store(sum_ptr + cols, x, mask=col_ok)
        tl.store(xn_ptr + cols, xn, mask=col_ok)


def norm_router(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                eps: float, router_weight: torch.Tensor, offset: float = 0.0,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token's residual add, RMSNorm and router projection in one launch: (normalised
    x + residual [1, H], x + residual [1, H], router logits [1, E] in x's dtype), as
    ``RMSNorm(x, residual)`` then ``router_weight``'s projection compute them. Saves the
    norm's launch on MoE decode steps."""
    tokens, hidden = x.shape
    experts = router_weight.shape[0]
    if tokens != 1 or residual.shape != x.shape or router_weight.shape != (experts, hidden) \
            or norm_weight.shape != (hidden,):
        raise ValueError(f"norm_router takes one token: x {tuple(x.shape)}, residual "
                         f"{tuple(residual.shape)}, norm weight {tuple(norm_weight.shape)}, "
                         f"router weight {tuple(router_weight.shape)}")
    x, residual = x.contiguous(), residual.contiguous()
    router_weight = router_weight.contiguous()
    total, normed = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(1, experts, dtype=x.dtype, device=x.device)
    block_e = 1
    _norm_router_kernel[(triton.cdiv(experts, block_e),)](
        x, residual, norm_weight, router_weight, total, normed, logits, experts, hidden, eps,
        offset, BLOCK_E=block_e, BLOCK_H=triton.next_power_of_2(hidden),
        num_warps=8 if hidden >= 2048 else 4, **pdl.options(x))
    return normed, total, logits


@dataclass(frozen=True)
class Router:
    """How each token's experts are chosen (``layers/moe.select_experts``' settings, apart
    from ``top_k``): softmax or sigmoid scores, DeepSeek's correction bias and grouped
    top-k, renormalisation of the chosen weights, a scale on them."""
    renormalize: bool = False
    scale: float = 1.0
    sigmoid: bool = False
    correction_bias: torch.Tensor | None = None
    num_expert_group: int = 1
    topk_group: int | None = None

    @property
    def groups(self) -> int:
        return max(1, self.num_expert_group or 1)

    def check(self, experts: int, top_k: int) -> None:
        from pagedllm.layers.moe import check_routing
        check_routing(experts, top_k, self.groups, self.topk_group,
                      self.correction_bias is not None)

    def constexprs(self, experts: int) -> dict:
        """``_topk_route``'s compile-time settings for ``experts`` experts."""
        groups = self.groups
        return dict(RENORM=self.renormalize, E_POW2=triton.next_power_of_2(experts),
                    SIGMOID=self.sigmoid, HAS_BIAS=self.correction_bias is not None,
                    GROUPS=triton.next_power_of_2(groups) if groups > 1 else 1,
                    TOPK_GROUP=self.topk_group or groups,
                    BY_TOP2=self.correction_bias is not None and groups > 1)


def route_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
               scale: float = 1.0, *, sigmoid: bool = False,
               correction_bias: torch.Tensor | None = None, num_expert_group: int = 1,
               topk_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` in one launch (softmax or sigmoid scores, DeepSeek's correction
    bias and grouped top-k, renormalisation, scaling): (weights [T, k] fp32, ids [T, k]
    int64)."""
    router = Router(renormalize, scale, sigmoid, correction_bias, num_expert_group,
                    topk_group)
    router.check(router_logits.shape[1], top_k)
    return _route(router_logits, top_k, router)


def _route(router_logits: torch.Tensor, top_k: int,
           router: Router) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_topk``'s launch for a checked ``router``."""
    tokens, experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
        bias = router.correction_bias
        bias = bias.contiguous() if bias is not None else logits
        _route_kernel[(tokens,)](
            logits, bias, weights, ids, experts, logits.stride(0), experts // router.groups,
            router.scale, TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k),
            **router.constexprs(experts), num_warps=1 if experts <= 128 else 2,
            **pdl.options(logits))
    return weights, ids


# (max tokens per expert on average, config) for the grouped GEMMs: the first row whose bound
# is >= T*k/E. A config is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the
# gate/up launch and for the down launch. Small batches are memory-bound: narrow column
# tiles give the SMs enough programs; large ones reuse each weight tile over more rows.
MOE_CONFIGS: list[tuple[float, tuple, tuple]] = [
    (1.0, (16, 32, 128, 4, 4), (16, 64, 128, 4, 4)),
    (8.0, (16, 64, 128, 4, 4), (16, 64, 128, 4, 4)),
    (32.0, (32, 64, 64, 4, 4), (32, 64, 64, 4, 4)),
    (float("inf"), (64, 128, 64, 8, 3), (64, 128, 64, 8, 3)),
]


def moe_config(tokens: int, top_k: int, num_experts: int) -> tuple[tuple, tuple]:
    """(gate/up config, down config) for this batch (``MOE_CONFIGS``)."""
    per_expert = tokens * top_k / num_experts
    for bound, gate_up, down in MOE_CONFIGS:
        if per_expert <= bound:
            return gate_up, down
    raise AssertionError("unreachable: the last bound is inf")


# pairs (T * k) up to which the one-program align kernel runs (decode batches); above, a few
# device-wide torch ops (prefill: the single program would loop over thousands of chunks)
ALIGN_KERNEL_MAX_PAIRS = 4096


def _align_torch(flat: torch.Tensor, num_experts: int, block_m: int, sorted_ids,
                 block_expert, num_padded) -> None:
    """``_align_kernel``'s result with device-wide torch ops (stable sort; no host sync)."""
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.sort(flat, stable=True).indices
    experts = flat[order]
    first = counts.cumsum(0) - counts  # each expert's first position among the sorted pairs
    dest = ends[experts] - padded[experts] + torch.arange(n, device=flat.device) - first[experts]
    sorted_ids.fill_(n)
    sorted_ids[dest] = order.to(torch.int32)
    rows = torch.arange(block_expert.numel(), device=flat.device) * block_m
    expert = torch.searchsorted(ends, rows, right=True)
    block_expert.copy_(torch.where(rows < ends[-1], expert, -1))
    num_padded.copy_(ends[-1:])


def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids [R] int32, block_expert [R / block_m] int32, num_padded [1] int32) for
    the flattened ``ids`` (module docstring, step 1). R is the worst case, from ids' shape."""
    n = ids.numel()
    max_rows = n + min(n, num_experts) * (block_m - 1)
    max_rows = triton.cdiv(max_rows, block_m) * block_m
    dev = ids.device
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    if n > ALIGN_KERNEL_MAX_PAIRS:
        _align_torch(ids.reshape(-1).long(), num_experts, block_m, sorted_ids, block_expert,
                     num_padded)
        return sorted_ids, block_expert, num_padded
    e_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, 8192 // e_pow2))
    _align_kernel[(1,)](ids.reshape(-1), sorted_ids, block_expert, num_padded, n, max_rows,
                        max_rows // block_m, BLOCK_M=block_m, E_POW2=e_pow2, CHUNK=chunk,
                        num_warps=4)
    return sorted_ids, block_expert, num_padded


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, routing, n_cols: int,
                  config: tuple, a_row_div: int, gated: bool,
                  topw: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
    """One launch of ``_moe_gemm_kernel`` over every row block and ``n_cols`` columns
    (``scale``: W's per-row scales [E, rows] when it holds int8 / fp8 codes)."""
    sorted_ids, block_expert, num_padded = routing
    block_m, block_n, block_k, warps, stages = config
    grid = (triton.cdiv(n_cols, block_n), block_expert.numel())
    s = scale if scale is not None else a
    _moe_gemm_kernel[grid](
        a, w, s, out, sorted_ids, block_expert, num_padded, topw if topw is not None else a,
        n_cols, w.shape[2], out.shape[0], a.stride(0), w.stride(0), w.stride(1), s.stride(0),
        out.stride(0), A_ROW_DIV=a_row_div, GATED=gated, WEIGHTED=topw is not None,
        SCALED=scale is not None, IEEE=a.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


# tokens up to which the experts run as the per-token GEMVs (``_moe_gemv_kernel``: no
# sorting, the top-k sum fused) instead of the sorted grouped GEMMs; (BLOCK_N, BLOCK_K,
# num_warps) of the gate/up and of the down launch. H100, Qwen3-30B-A3B experts
# (moe_bench --tune, 2026-12-07): one token 34.8 us (0.73 of copy) against 39.0 sorted;
# from two tokens the sorted GEMMs were faster (61.6 vs 73.7 us, untuned GEMVs)
MOE_GEMV_MAX_TOKENS = 1
MOE_GEMV_CONFIGS = ((1, 256, 4), (2, 256, 8))


def moe_path(tokens: int, top_k: int, num_experts: int,
             gemv: bool | None = None) -> tuple[bool, tuple[tuple, tuple]]:
    """(whether the per-token GEMVs run, that path's (gate/up, down) configs) for this batch:
    the GEMVs up to ``MOE_GEMV_MAX_TOKENS`` tokens (``gemv`` forces either path) with
    ``MOE_GEMV_CONFIGS``, else the sorted GEMMs with ``moe_config``'s row."""
    use_gemv = tokens <= MOE_GEMV_MAX_TOKENS if gemv is None else gemv
    return use_gemv, MOE_GEMV_CONFIGS if use_gemv else moe_config(tokens, top_k, num_experts)


def _gemv_launch(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ids: torch.Tensor,
                 topw: torch.Tensor | None, n_cols: int, config: tuple,
                 scale: torch.Tensor | None = None,
                 routing: tuple[Router, torch.Tensor] | None = None) -> None:
    """One ``_moe_gemv_kernel`` launch: gate/up when ``topw`` is None or ``routing`` (router,
    logits [T, E]) is given (then routed inside: ``ids`` and ``topw`` are written), else
    down."""
    tokens, top_k = ids.shape
    block_n, block_k, warps = config
    block_k = min(block_k, triton.next_power_of_2(w.shape[2]))
    vec = min(16 // w.element_size(), block_k)
    s = scale if scale is not None else a
    router, logits = routing if routing is not None else (Router(), a[:, :1])
    experts = logits.shape[1]
    bias = router.correction_bias if router.correction_bias is not None else a
    _moe_gemv_kernel[(triton.cdiv(n_cols, block_n), tokens)](
        a, w, s, out, ids, topw if topw is not None else a, n_cols, w.shape[2], a.stride(0),
        w.stride(0), w.stride(1), s.stride(0), out.stride(0), logits, bias, experts,
        logits.stride(0), experts // router.groups, router.scale, TOP_K=top_k,
        K_POW2=triton.next_power_of_2(top_k), GATED=topw is None or routing is not None,
        SCALED=scale is not None, BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec,
        ROUTED=routing is not None, **router.constexprs(experts), num_warps=warps,
        **pdl.options(a))


def fused_moe_gemv(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   topw: torch.Tensor, ids: torch.Tensor,
                   configs: tuple[tuple, tuple] | None = None,
                   scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                   routing: tuple[Router, torch.Tensor] | None = None) -> torch.Tensor:
    """``fused_moe`` for a few tokens in two launches: each token's experts' gate/up rows
    (SiLU * up fused), then their down rows with the routing weights and the top-k sum
    fused; reads each (token, expert) pair's weights once, no sorting. ``routing``
    (router, logits [T, E]): the gate/up launch routes each token and writes ``topw`` and
    ``ids`` for the down launch."""
    tokens, top_k = ids.shape
    inter, hidden = down.shape[2], down.shape[1]
    gate_up_cfg, down_cfg = configs or MOE_GEMV_CONFIGS
    gate_up_scale, down_scale = scales or (None, None)
    ids = ids.contiguous()
    act = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _gemv_launch(x, gate_up, act, ids, topw if routing is not None else None, inter,
                 gate_up_cfg, gate_up_scale, routing)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    _gemv_launch(act, down, out, ids, topw, hidden, down_cfg, down_scale)
    return out


def _check_scales(gate_up: torch.Tensor, down: torch.Tensor, scales) -> tuple | None:
    """The per-row scales as contiguous fp32 [E, rows], checked against the codes."""
    if scales is None:
        return None
    out = tuple(s.float().contiguous() for s in scales)
    if out[0].shape != gate_up.shape[:2] or out[1].shape != down.shape[:2]:
        raise ValueError(f"fused_moe scales {[tuple(s.shape) for s in out]} do not match the "
                         f"experts' rows {tuple(gate_up.shape[:2])} / {tuple(down.shape[:2])}")
    return out


def _check_shapes(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  routing: tuple[int, int], name: str) -> None:
    """ValueError unless x [T, H], gate_up [E, 2I, H], down [E, H, I] and the routing
    tensor's [T, *] (``name``: ids [T, k] or router logits [T, E]) agree."""
    num_experts, two_i, hidden = gate_up.shape
    if x.shape != (routing[0], hidden) or down.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, {name} "
                         f"{routing}, gate_up {tuple(gate_up.shape)}, down "
                         f"{tuple(down.shape)}")


def fused_moe_routed(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                     logits: torch.Tensor, top_k: int, router: Router,
                     configs: tuple[tuple, tuple] | None = None, gemv: bool | None = None,
                     scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route_topk`` then ``fused_moe`` from the router logits [T, E]: (out [T, H],
    weights [T, k] fp32, ids [T, k] int64). Where the per-token GEMVs serve the batch
    (decode), the gate/up launch routes each token itself and hands the routing to the
    down launch: two launches a layer instead of three."""
    num_experts, tokens = gate_up.shape[0], x.shape[0]
    if logits.shape != (tokens, num_experts):
        raise ValueError(f"router logits {tuple(logits.shape)} must be [{tokens}, "
                         f"{num_experts}] (tokens, experts)")
    router.check(num_experts, top_k)
    use_gemv, table = moe_path(tokens, top_k, num_experts, gemv)
    if not use_gemv or tokens == 0:
        weights, ids = _route(logits, top_k, router)
        return fused_moe(x, gate_up, down, weights, ids, configs, gemv, scales), weights, ids
    _check_shapes(x, gate_up, down, (tokens, num_experts), "router logits")
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    if router.correction_bias is not None:
        router = replace(router, correction_bias=router.correction_bias.contiguous())
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    topw = torch.empty(tokens * top_k, dtype=torch.float32, device=x.device)
    out = fused_moe_gemv(x, gate_up, down, topw, ids, configs or table,
                         _check_scales(gate_up, down, scales), (router, logits))
    return out, topw.view(tokens, top_k), ids


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              weights: torch.Tensor, ids: torch.Tensor,
              configs: tuple[tuple, tuple] | None = None,
              gemv: bool | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = ids[t, k].

    x [T, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I]; weights [T, k] (any
    float dtype); ids [T, k] (any int dtype). Returns [T, H] in x's dtype. ``scales``:
    (gate_up [E, 2I], down [E, H]) per-row scales when the experts hold int8 / fp8 codes
    (``experts_int8``): the kernels read the codes and scale each row's sums. Up to
    ``MOE_GEMV_MAX_TOKENS`` tokens the per-token GEMVs run (``gemv`` forces either path);
    ``configs`` overrides the path's table (tuning)."""
    tokens, top_k = ids.shape
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    _check_shapes(x, gate_up, down, (tokens, top_k), "ids")
    if tokens == 0:
        return torch.zeros_like(x)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    scales = _check_scales(gate_up, down, scales)
    topw = weights.reshape(-1).float().contiguous()
    use_gemv, table = moe_path(tokens, top_k, num_experts, gemv)
    if use_gemv:
        return fused_moe_gemv(x, gate_up, down, topw, ids, configs or table, scales)
    gate_up_cfg, down_cfg = configs or table
    gate_up_scale, down_scale = scales or (None, None)
    act = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    routing = align_block_size(ids, num_experts, gate_up_cfg[0])
    _grouped_gemm(x, gate_up, act, routing, inter, gate_up_cfg, top_k, True, None,
                  gate_up_scale)
    if down_cfg[0] != gate_up_cfg[0]:
        routing = align_block_size(ids, num_experts, down_cfg[0])
    y = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, down, y, routing, hidden, down_cfg, 1, False, topw, down_scale)
    return y.view(tokens, top_k, hidden).sum(dim=1)
