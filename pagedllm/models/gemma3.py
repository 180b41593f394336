"""Gemma 3, text only (``Gemma3ForCausalLM``): Gemma 2's block with Gemma 3's attention.

What differs from Gemma 2 (``gemma.py``):
- per-head q/k RMSNorms of the ``1 + weight`` kind (applied here, before the attention
  layer, since the fused CUDA q/k-norm path assumes plain ``weight`` norms);
- no attention logit soft-cap by default (``attn_logit_softcapping`` None);
- each layer's kind comes from ``layer_types`` (five sliding layers per global one by
  default) and each kind has its own rotary: transformers 5 nests them in
  ``rope_parameters`` by layer type; transformers 4 configs give the sliding layers
  ``rope_local_base_freq`` and the global ones ``rope_theta`` + ``rope_scaling``.
Sandwich norms, ``sqrt(hidden_size)`` embedding scale, tanh GELU, tied head, final logit
soft-cap, tensor and pipeline parallelism are Gemma 2's.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.gemma import Gemma2ForCausalLM, GemmaDecoderLayer, GemmaModel
from pagedllm.models.llama import LlamaAttention


def layer_rope_parameters(config, layer_type: str) -> dict:
    """The rotary parameters of one layer kind, from either config generation."""
    nested = getattr(config, "rope_parameters", None)
    if isinstance(nested, dict) and layer_type in nested:
        params = dict(nested[layer_type])
    elif layer_type == "sliding_attention":
        params = {"rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    else:
        params = rope_parameters(config)
    params.setdefault("rope_theta", 10000.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    return params


def _layer_type(config, layer_idx: int) -> str:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[layer_idx]
    pattern = getattr(config, "sliding_window_pattern", 6)
    return "sliding_attention" if (layer_idx + 1) % pattern else "full_attention"


class Gemma3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, max_position: int) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, max_position, qkv_bias=bias, qk_norm=False)
        layer_type = _layer_type(config, layer_idx)
        self.gemma_q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        self.gemma_k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, offset=1.0)
        max_position = max(max_position, getattr(config, "max_position_embeddings", 0))
        self.rotary_emb = RotaryEmbedding(self.head_dim, self.head_dim, max_position,
                                          layer_rope_parameters(config, layer_type))
        self.attn.scale = config.query_pre_attn_scalar ** -0.5
        self.attn.soft_cap = getattr(config, "attn_logit_softcapping", None)
        self.attn.sliding_window = (config.sliding_window
                                    if layer_type == "sliding_attention" else None)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, lora=ctx.lora))
        tokens = hidden.shape[0]
        q = self.gemma_q_norm(q.reshape(tokens, self.num_heads, self.head_dim)).flatten(1)
        k = self.gemma_k_norm(k.reshape(tokens, self.num_kv_heads, self.head_dim)).flatten(1)
        return self.o_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb), lora=ctx.lora)


def _rename(name: str) -> str:
    """Checkpoints call the q/k norms ``q_norm`` / ``k_norm``; the model keeps them apart
    from ``LlamaAttention``'s (which the attention layer would apply as plain norms)."""
    return (name.replace(".self_attn.q_norm.", ".self_attn.gemma_q_norm.")
            .replace(".self_attn.k_norm.", ".self_attn.gemma_k_norm."))


class Gemma3DecoderLayer(GemmaDecoderLayer):
    def __init__(self, config, layer_idx: int, max_position: int) -> None:
        super().__init__(config, layer_idx, max_position, is_gemma2=True)
        self.self_attn = Gemma3Attention(config, layer_idx, max_position)


class Gemma3Model(GemmaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return Gemma3DecoderLayer(config, layer_idx, max_position)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def make_model(self, config, max_position: int) -> nn.Module:
        return Gemma3Model(config, max_position, self.tie_word_embeddings, is_gemma2=True)

    def load_weights(self, weights):
        return super().load_weights((_rename(n), t) for n, t in weights)
