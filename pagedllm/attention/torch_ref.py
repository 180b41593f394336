"""Paged attention in plain PyTorch: the CPU backend and the oracle for GPU kernels.

Keys and values are read from the paged cache through block tables, never from a contiguous
per-request cache. Steps of one layer call:
1. write this step's K/V into the cache at ``slot_mapping``;
2. decodes: gather every decode request's blocks at once ([num_decodes, max_blocks]) and
   attend with a length/window mask (whole blocks are gathered: index_select of blocks is
   about 2x faster on CPU than gathering single slots);
3. prefills: per request, gather its context+new key blocks and attend with a causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.attention.kv_quant import is_fp8, quantize


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    # kv_cache [2, num_slots, num_kv_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
    if is_fp8(kv_cache.dtype):  # CPU index ops lack fp8: move the bytes as uint8
        raw = kv_cache.view(torch.uint8)
        raw[0].index_copy_(0, slot_mapping, quantize(k, kv_cache.dtype, k_scale).view(torch.uint8))
        raw[1].index_copy_(0, slot_mapping, quantize(v, kv_cache.dtype, v_scale).view(torch.uint8))
        return
    kv_cache[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            scale: float, soft_cap: float | None) -> torch.Tensor:
    """q [batch, num_heads, q_len, d]; k, v [batch, num_kv_heads, k_len, d]; bias broadcastable
    to [batch, 1, q_len, k_len] -> [batch, num_heads, q_len, d]."""
    if not soft_cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale,
                                              enable_gqa=True)
    # Soft-capping (Gemma 2) needs the raw scores: the explicit path.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    fp8 = is_fp8(kv_cache.dtype)
    raw = kv_cache.view(torch.uint8) if fp8 else kv_cache
    blocks = raw.view(2, -1, meta.block_size, *kv_cache.shape[2:])  # [2, blocks, bs, h, d]

    def gather(which: int, block_ids: torch.Tensor) -> torch.Tensor:
        x = _gather(blocks[which], block_ids)
        if not fp8:
            return x.to(q.dtype)
        return x.view(kv_cache.dtype).to(q.dtype) * (k_scale, v_scale)[which]

    if nd:
        table = meta.decode_block_table  # [nd, max_blocks]
        k = gather(0, table.flatten()).view(nd, -1, *kv_cache.shape[2:])
        v = gather(1, table.flatten()).view(nd, -1, *kv_cache.shape[2:])
        o = _attend(q[:nd].unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                    meta.decode_bias(sliding_window), scale, soft_cap)
        out[:nd] = o.squeeze(2)  # [nd, num_heads, d]
    for idx, seq in enumerate(meta.prefills):
        rows = slice(seq.token_start, seq.token_start + seq.num_query_tokens)
        k = gather(0, seq.block_ids)[:seq.seq_len]  # [seq_len, h, d]
        v = gather(1, seq.block_ids)[:seq.seq_len]
        o = _attend(q[rows].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), meta.prefill_bias(idx, sliding_window),
                    scale, soft_cap)
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _gather(blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """blocks [num_blocks, bs, h, d], block_ids [n] -> keys [n * bs, h, d] in table order."""
    return blocks.index_select(0, block_ids).flatten(0, 1)


class TorchRefBackend(AttentionBackend):
    name = "torch"

    def write_kv_cache(self, kv_cache, k, v, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
        write_kv_cache(kv_cache, k, v, slot_mapping, k_scale, v_scale)

    def attend(self, q, kv_cache, meta, *, scale, sliding_window, soft_cap, k_scale=1.0,
               v_scale=1.0) -> torch.Tensor:
        return paged_attention(q, kv_cache, meta, scale=scale, sliding_window=sliding_window,
                               soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale)


DEFAULT_BACKEND = TorchRefBackend()
