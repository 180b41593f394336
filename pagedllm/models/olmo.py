"""OLMo (allenai/OLMo-*-hf) and OLMo 2 (allenai/OLMo-2-*): Llama's decoder with other norms.

OLMo differs from Llama in:
- LayerNorms without weight or bias (eps 1e-5) where Llama has RMSNorms;
- ``clip_qkv``: q, k and v clamped to [-clip_qkv, clip_qkv] after the projection.
OLMo 2 differs from Llama in:
- no norm before attention or the MLP; RMSNorms after them instead
  (``post_attention_layernorm``, ``post_feedforward_layernorm``) before each residual add:
  ``x = x + norm(attn(x)); x = x + norm(mlp(x))``;
- ``q_norm`` / ``k_norm``: RMSNorms over the whole q and k projections (all heads, not per
  head), before rotary; under tensor parallelism each rank's slice is normalised with the
  mean square summed over the ranks (``ShardedRMSNorm``).
Tensor and pipeline parallelism and the quant prefixes come from the Llama classes.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.layers.norm import RMSNorm, ShardedRMSNorm
from pagedllm.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from pagedllm.models.starcoder2 import ResidualLayerNorm


def _plain_layer_norm(config) -> ResidualLayerNorm:
    return ResidualLayerNorm(config.hidden_size, eps=1e-5, elementwise_affine=False)


class OlmoAttention(LlamaAttention):
    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.clip_qkv = getattr(config, "clip_qkv", None)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(hidden, lora=ctx.lora)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = self.qkv_proj.split(qkv)
        return self.o_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb), lora=ctx.lora)


class OlmoDecoderLayer(LlamaDecoderLayer):
    """Llama's layer (and forward) with OLMo's attention and plain LayerNorms."""

    def __init__(self, config, layer_idx: int, max_position: int, *, quant_config=None,
                 prefix: str = "", **attn_kwargs) -> None:
        nn.Module.__init__(self)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.self_attn = OlmoAttention(config, layer_idx, max_position, **attn_kwargs,
                                       quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.input_layernorm = _plain_layer_norm(config)
        self.post_attention_layernorm = _plain_layer_norm(config)


class OlmoModel(LlamaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return OlmoDecoderLayer(config, layer_idx, max_position, quant_config=self.quant_config,
                                prefix=f"{self.prefix}.layers.{layer_idx}", **kwargs)

    def make_norm(self, config) -> nn.Module:
        return _plain_layer_norm(config)


class OlmoForCausalLM(LlamaForCausalLM):
    supports_quantization = True

    def make_model(self, config, max_position: int) -> nn.Module:
        return OlmoModel(config, max_position, self.tie_word_embeddings, self.quant_config,
                         qkv_bias=self._qkv_bias(config), qk_norm=False)


class Olmo2Attention(LlamaAttention):
    """q/k norms over the whole projections (this rank's slice of them)."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        qkv, eps = self.qkv_proj, config.rms_norm_eps
        self.q_norm = ShardedRMSNorm(qkv.q_start * self.head_dim, qkv.num_heads * self.head_dim,
                                     eps)
        self.k_norm = ShardedRMSNorm(qkv.kv_start * self.head_dim,
                                     qkv.num_kv_heads * self.head_dim, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, lora=ctx.lora))
        q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb), lora=ctx.lora)


class Olmo2DecoderLayer(nn.Module):
    """Takes and returns ``(hidden, residual)`` like Llama's layers (the stream is their
    sum; the final norm adds them): ``x = h + r; x = x + norm(attn(x));`` returns
    ``(norm(mlp(x)), x)``."""

    def __init__(self, config, layer_idx: int, max_position: int, *, quant_config=None,
                 prefix: str = "", **attn_kwargs) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx, max_position, **attn_kwargs,
                                        quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        if residual is not None:
            hidden = hidden + residual
        hidden = hidden + self.post_attention_layernorm(self.self_attn(positions, hidden, ctx))
        return self.post_feedforward_layernorm(self.mlp(hidden, ctx.lora)), hidden


class Olmo2Model(LlamaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return Olmo2DecoderLayer(config, layer_idx, max_position,
                                 quant_config=self.quant_config,
                                 prefix=f"{self.prefix}.layers.{layer_idx}", **kwargs)


class Olmo2ForCausalLM(LlamaForCausalLM):
    supports_quantization = True

    def make_model(self, config, max_position: int) -> nn.Module:
        return Olmo2Model(config, max_position, self.tie_word_embeddings, self.quant_config,
                          qkv_bias=self._qkv_bias(config), qk_norm=False)
