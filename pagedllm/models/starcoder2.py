"""StarCoder2 (bigcode/starcoder2-*): Llama's decoder with GPT-style pieces.

What differs from Llama:
- LayerNorm with bias (``norm_epsilon``) instead of RMSNorm, in the same places;
- q/k/v and o projections carry a bias when ``use_bias`` (the default);
- a plain MLP ``c_fc`` -> ``hidden_act`` (tanh GELU) -> ``c_proj``, with biases;
- the LM head is tied to the embedding by default; ``sliding_window`` (if set) applies to
  every layer.
Tensor and pipeline parallelism come from the Llama classes this file extends.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.parallel import ColumnParallelLinear, RowParallelLinear
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class ResidualLayerNorm(nn.LayerNorm):
    """LayerNorm with RMSNorm's residual interface (the Llama stack calls norms so):
    ``norm(x, residual)`` returns ``(norm(x + residual), x + residual)``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x + residual
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps), x

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None):
        return (self(x), x) if residual is None else self(x, residual)


class Starcoder2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = bool(getattr(config, "use_bias", True))
        self.c_fc = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def _norm(config) -> ResidualLayerNorm:
    return ResidualLayerNorm(config.hidden_size, eps=config.norm_epsilon)


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int) -> None:
        super().__init__()
        bias = bool(getattr(config, "use_bias", True))
        # LlamaAttention reads the o_proj bias from attention_bias: StarCoder2 calls it use_bias
        attn_config = copy.copy(config)
        attn_config.attention_bias = bias
        self.self_attn = LlamaAttention(attn_config, layer_idx, max_position, qkv_bias=bias,
                                        qk_norm=False)
        self.mlp = Starcoder2MLP(config)
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)

    forward = LlamaDecoderLayer.forward  # the same pre-norm block around its own parts


class Starcoder2Model(LlamaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return Starcoder2DecoderLayer(config, layer_idx, max_position)

    def make_norm(self, config) -> nn.Module:
        return _norm(config)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    tied_by_default = True

    def make_model(self, config, max_position: int) -> nn.Module:
        return Starcoder2Model(config, max_position, self.tie_word_embeddings)
