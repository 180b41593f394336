"""Paged attention in plain PyTorch: the CPU backend and the oracle for GPU kernels.

Keys and values are read from the paged cache through per-request slot lists derived from
block tables, never from a contiguous per-request cache. Steps of one layer call:
1. write this step's K/V into the cache at ``slot_mapping``;
2. decodes: gather every decode request's keys at once ([num_decodes, max_len]) and attend
   with a length/window mask;
3. prefills: per request, gather its context+new keys and attend with a causal mask.
"""
from __future__ import annotations

import torch

from pagedllm.attention.backend import AttentionMetadata


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    # kv_cache [2, num_slots, num_kv_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
    kv_cache[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            scale: float, soft_cap: float | None) -> torch.Tensor:
    """q [..., kv_heads, group, q_len, d]; k/v [..., kv_heads, 1, k_len, d] -> like q."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if soft_cap:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        slots = meta.decode_key_slots  # [nd, max_len]
        k = kv_cache[0][slots].to(q.dtype)  # [nd, max_len, kv_heads, d]
        v = kv_cache[1][slots].to(q.dtype)
        qd = q[:nd].view(nd, num_kv_heads, group, 1, head_dim)
        o = _attend(qd, k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2),
                    meta.decode_bias(sliding_window).unsqueeze(1), scale, soft_cap)
        out[:nd] = o.view(nd, num_heads, head_dim)
    for idx, seq in enumerate(meta.prefills):
        rows = slice(seq.token_start, seq.token_start + seq.num_query_tokens)
        k = kv_cache[0][seq.key_slots].to(q.dtype)  # [seq_len, kv_heads, d]
        v = kv_cache[1][seq.key_slots].to(q.dtype)
        qp = q[rows].view(seq.num_query_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        o = _attend(qp, k.permute(1, 0, 2).unsqueeze(1), v.permute(1, 0, 2).unsqueeze(1),
                    meta.prefill_bias(idx, sliding_window), scale, soft_cap)
        out[rows] = o.permute(2, 0, 1, 3).reshape(seq.num_query_tokens, num_heads, head_dim)
    return out
