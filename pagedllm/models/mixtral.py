"""Mixtral, and the Llama-shaped mixture-of-experts decoder the MoE models share.

A MoE decoder is Llama's (attention, RMSNorms, residual stream, pipeline stages, LM head):
only each layer's feed-forward differs. ``MoEDecoderLayer`` takes that feed-forward from the
causal LM's ``make_mlp(config, layer_idx)`` (a ``MoEBlock``, or a dense ``LlamaMLP`` on the
layers a Qwen-MoE config keeps dense).

What Mixtral sets: softmax router over ``num_local_experts`` with the chosen
``num_experts_per_tok`` weights renormalised, SiLU experts of ``intermediate_size``, no
shared expert. Hub checkpoints name the block ``block_sparse_moe`` with per-expert
``w1``/``w3``/``w2`` (gate/up/down); transformers 5 keeps it in memory as ``mlp`` with
stacked ``experts.gate_up_proj`` / ``experts.down_proj``; both load (renamed to ``mlp``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.layers.moe import MoEBlock, load_moe_weights
from pagedllm.layers.norm import RMSNorm
from pagedllm.models.llama import (STACKED, LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM,
                                   LlamaModel)
from pagedllm.models.utils import tie_or_skip


class MoEDecoderLayer(nn.Module):
    """Llama's pre-norm block with the feed-forward ``mlp`` built by ``make_mlp``."""

    def __init__(self, config, layer_idx: int, max_position: int, make_mlp, *,
                 quant_config=None, prefix: str = "", **attn_kwargs) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, max_position, **attn_kwargs,
                                        quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = make_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx):
        """Llama's pre-norm block; a ``MoEBlock`` takes the post-attention norm itself (on
        decode steps it runs with the router in one launch)."""
        if not isinstance(self.mlp, MoEBlock):
            return LlamaDecoderLayer.forward(self, positions, hidden, residual, ctx)
        hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        return self.mlp.norm_forward(hidden, residual, self.post_attention_layernorm)


class MoEModel(LlamaModel):
    """Llama's pipeline-staged stack of ``MoEDecoderLayer``s."""

    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return MoEDecoderLayer(config, layer_idx, max_position, quant_config=self.quant_config,
                               prefix=f"{self.prefix}.layers.{layer_idx}", **kwargs)


def _hub_to_model_name(name: str) -> str:
    """Hub Mixtral checkpoints call the MoE block ``block_sparse_moe``; the model (as
    transformers 5) calls it ``mlp``."""
    return name.replace(".block_sparse_moe.", ".mlp.")


class MoECausalLM(LlamaForCausalLM):
    """Llama's causal LM (tensor and pipeline parallel) whose layers' feed-forward comes from
    ``make_mlp``; loads per-expert and stacked expert checkpoints. Quantization: the
    architectures below declare ``supports_quantization``; their experts take a method's
    ``moe_method_for`` (``experts_int8``, or ``fp8`` on an unquantized checkpoint; the other
    methods refuse MoE experts at start-up)."""
    supports_expert_quantization = True  # --quantization experts_int8

    def make_model(self, config, max_position: int) -> nn.Module:
        return MoEModel(config, max_position, self.tie_word_embeddings, self.quant_config,
                        qkv_bias=self._qkv_bias(config), qk_norm=self.qk_norm,
                        make_mlp=self.make_mlp)

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        raise NotImplementedError  # each MoE architecture builds its own

    def moe_kwargs(self, layer_idx: int) -> dict:
        """What a ``MoEBlock`` needs to pick its experts' quant method."""
        return {"quant_config": self.quant_config, "prefix": f"model.layers.{layer_idx}.mlp"}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_moe_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings),
                                rename=_hub_to_model_name)


class MixtralForCausalLM(MoECausalLM):
    supports_quantization = True

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return MoEBlock(config.hidden_size, config.num_local_experts,
                        config.num_experts_per_tok, config.intermediate_size,
                        config.hidden_act, renormalize=True, **self.moe_kwargs(layer_idx))
