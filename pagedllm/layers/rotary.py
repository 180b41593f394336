"""Rotary position embeddings (RoPE) and their context-extension variants.

``rope_parameters(hf_config)`` reads both config shapes: transformers 5's ``rope_parameters``
dict and transformers 4's ``rope_theta`` + ``rope_scaling``. The cos/sin table is computed once
for every position up to ``max_position`` and indexed by ``positions`` each forward.
Variants: default, linear, dynamic (NTK base fixed for max_position, like vLLM), llama3,
yarn, longrope (long factors when the context exceeds the original length).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pagedllm.layers import fused


def rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        params = dict(params)
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_theta", 10000.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_medium, smoothed, out)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 without scaling)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _yarn_attention_factor(p: dict, factor: float) -> float:
    """The cos/sin scale: ``attention_factor`` if given; DeepSeek's configs give ``mscale``
    and ``mscale_all_dim`` instead (their ratio; the all-dim part moves into the softmax
    scale, see ``mla_softmax_scale``)."""
    if p.get("attention_factor") is not None:
        return p["attention_factor"]
    if p.get("mscale") and p.get("mscale_all_dim"):
        return yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
    return yarn_mscale(factor)


def _yarn(base: float, dim: int, p: dict, max_position: int) -> tuple[torch.Tensor, float]:
    old_len = p.get("original_max_position_embeddings") or max_position
    factor = p["factor"]
    mscale = _yarn_attention_factor(p, factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    extrapolation = 1 - ramp.clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq, mscale


def _longrope(base: float, dim: int, p: dict, max_position: int,
              original: int) -> tuple[torch.Tensor, float]:
    use_long = max_position > original
    factors = torch.tensor(p["long_factor"] if use_long else p["short_factor"],
                           dtype=torch.float32)
    scale = max_position / original
    mscale = p.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    return 1.0 / (factors * base ** (torch.arange(0, dim, 2).float() / dim)), mscale


def compute_inv_freq(rotary_dim: int, params: dict, max_position: int,
                     original_max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] and the cos/sin magnitude scale of a rope type."""
    base, kind = params["rope_theta"], params["rope_type"]
    if kind == "default":
        return _default_inv_freq(base, rotary_dim), 1.0
    if kind == "linear":
        return _default_inv_freq(base, rotary_dim) / params["factor"], 1.0
    if kind == "dynamic":
        factor = params["factor"]
        base = base * (factor - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _default_inv_freq(base, rotary_dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(_default_inv_freq(base, rotary_dim), params), 1.0
    if kind == "yarn":
        return _yarn(base, rotary_dim, params, original_max_position)
    if kind == "longrope":
        original = params.get("original_max_position_embeddings") or original_max_position
        return _longrope(base, rotary_dim, params, max_position, original)
    raise ValueError(f"rope type {kind!r} is not supported; supported: default, linear, "
                     "dynamic, llama3, yarn, longrope")


class RotaryEmbedding(nn.Module):
    """Neox-style rotation (rotate halves) of the first ``rotary_dim`` dims of each head."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, params: dict,
                 original_max_position: int | None = None, is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        inv_freq, scale = compute_inv_freq(rotary_dim, params, max_position,
                                           original_max_position or max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        if is_neox_style:  # full-width tables: x * cos + rotate_half(x) * sin
            freqs = torch.cat((freqs, freqs), dim=-1)
        else:
            freqs = freqs.repeat_interleave(2, dim=-1)
        # [max_position, rotary_dim] each
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [num_tokens]; q [num_tokens, num_heads, head_dim]; k [.., num_kv_heads, ..]
        if self.is_neox_style and fused.use(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            fused.ops().rotary_neox(positions, q, k, self.cos, self.sin, self.rotary_dim)
            return q, k  # rotated in place by one Triton kernel per tensor
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [num_tokens, 1, rotary_dim]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim < self.head_dim:
            rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
            return torch.cat((self._rotate_full(rot, cos, sin), rest), dim=-1)
        return self._rotate_full(x, cos, sin)

    def _rotate_full(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.is_neox_style:
            x1, x2 = x.chunk(2, dim=-1)
            rotated = torch.cat((-x2, x1), dim=-1)
        else:
            rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


def get_rope(hf_config, head_dim: int, max_position: int) -> RotaryEmbedding:
    params = rope_parameters(hf_config)
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * (partial or 1.0))
    original = getattr(hf_config, "original_max_position_embeddings", None) or \
        getattr(hf_config, "max_position_embeddings", max_position)
    return RotaryEmbedding(head_dim, rotary_dim, max(max_position, original), params, original)
