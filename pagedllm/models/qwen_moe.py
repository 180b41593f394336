"""Qwen2-MoE and Qwen3-MoE: the MoE decoder of ``mixtral.py`` with Qwen's attention.

What they set:
- a softmax router over ``num_experts``; the chosen ``num_experts_per_tok`` weights are
  renormalised only if ``norm_topk_prob``; experts of ``moe_intermediate_size``;
- which layers are sparse: layer ``i`` is a MoE layer unless ``i`` is in ``mlp_only_layers``,
  and only when ``(i + 1) % decoder_sparse_step == 0``; the others keep a dense MLP of
  ``intermediate_size``;
- Qwen2-MoE: q/k/v bias (``qkv_bias``, default on) and a shared expert of
  ``shared_expert_intermediate_size`` that every token passes through, scaled by
  ``sigmoid(shared_expert_gate(x))``;
- Qwen3-MoE: Qwen3's per-head q/k RMSNorm, no bias (unless ``attention_bias``), no shared
  expert.
"""
from __future__ import annotations

from torch import nn

from pagedllm.layers.moe import MoEBlock
from pagedllm.models.llama import LlamaMLP
from pagedllm.models.mixtral import MoECausalLM


def is_sparse_layer(config, layer_idx: int) -> bool:
    """Hugging Face's rule for which Qwen-MoE layers route through experts."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % step == 0)


class Qwen2MoeForCausalLM(MoECausalLM):
    supports_quantization = True
    qkv_bias = True

    def _qkv_bias(self, config) -> bool:
        return bool(getattr(config, "qkv_bias", True))

    def make_shared_expert(self, config, layer_idx: int) -> nn.Module | None:
        size = getattr(config, "shared_expert_intermediate_size", 0) or 0
        return LlamaMLP(config.hidden_size, size, config.hidden_act,
                        quant_config=self.quant_config,
                        prefix=f"model.layers.{layer_idx}.mlp.shared_expert") if size else None

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        if not is_sparse_layer(config, layer_idx):
            return LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=self.quant_config, prefix=f"model.layers.{layer_idx}.mlp")
        shared = self.make_shared_expert(config, layer_idx)
        return MoEBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                        config.moe_intermediate_size, config.hidden_act,
                        renormalize=bool(getattr(config, "norm_topk_prob", False)),
                        shared_expert=shared, shared_expert_gate=shared is not None,
                        **self.moe_kwargs(layer_idx))


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    supports_quantization = True
    qk_norm = True

    def _qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def make_shared_expert(self, config, layer_idx: int) -> nn.Module | None:
        return None
