"""The attention layer models use: writes K/V to the paged cache, then attends through it."""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.torch_ref import DEFAULT_BACKEND


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                positions: torch.Tensor | None = None, rotary=None, q_norm=None,
                k_norm=None) -> torch.Tensor:
        """q [num_tokens, num_heads * head_dim]; k, v [num_tokens, num_kv_heads * head_dim].
        With ``rotary`` (and Qwen3's per-head ``q_norm``/``k_norm``) q and k are normalised
        and rotated at ``positions`` here, where the backend can fuse it with the KV write."""
        num_tokens = q.shape[0]
        kv_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn_metadata
        backend = ctx.backend or DEFAULT_BACKEND
        k_scale, v_scale = ctx.kv_scales[self.layer_idx] if ctx.kv_scales else (1.0, 1.0)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kw = dict(scale=self.scale, sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                  k_scale=k_scale, v_scale=v_scale)
        if rotary is not None:
            fused = backend.rope_attend(q, k, v, kv_cache, meta, positions, rotary, q_norm,
                                        k_norm, **kw)
            if fused is not None:  # decode steps: rotary and the KV write inside attention
                return fused.view(num_tokens, self.num_heads * self.head_dim)
            q = backend.rope_write_kv_cache(kv_cache, q, k, v, meta.slot_mapping, positions,
                                            rotary, q_norm, k_norm, k_scale, v_scale)
        else:
            backend.write_kv_cache(kv_cache, k, v, meta.slot_mapping, k_scale, v_scale)
        out = backend.attend(q, kv_cache, meta, **kw)
        return out.view(num_tokens, self.num_heads * self.head_dim)
