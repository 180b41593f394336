"""Gemma and Gemma 2: Llama-shaped decoders (the attention and MLP are llama.py's).

What Gemma changes from Llama:
- token embeddings are multiplied by ``sqrt(hidden_size)``, rounded to the model dtype first
  (as HF does, so bf16 uses 55.5 rather than 55.4256 for hidden 3072);
- RMSNorm scales by ``1 + weight`` (``offset=1``);
- the MLP activation is tanh-approximated GELU (``hidden_activation``; Gemma's legacy
  ``"gelu"`` means the tanh form too); ``head_dim`` comes from the config;
- the LM head is tied to the embedding (by default).
Tensor and pipeline parallelism come from the Llama classes this file extends.
Gemma 2 further adds:
- attention scale ``query_pre_attn_scalar ** -0.5`` and attention logit soft-capping;
- final logit soft-capping (``final_logit_softcapping``);
- a sandwich block: post-attention, pre-feedforward and post-feedforward RMSNorms;
- a sliding window on alternate layers (``layer_types``, or even layers when absent).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.layers.norm import RMSNorm
from pagedllm.models.llama import (LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel,
                                   layer_sliding_window)


def _activation(config) -> str:
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    return "gelu_pytorch_tanh" if act == "gelu" else act


def _norm(config) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)


def _gemma2_window(config, layer_idx: int) -> int | None:
    """Per ``layer_types`` when present; older configs make even layers sliding."""
    if getattr(config, "layer_types", None) is not None:
        return layer_sliding_window(config, layer_idx)
    return config.sliding_window if layer_idx % 2 == 0 else None


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma 2's scale, logit soft-cap and per-layer window."""

    def __init__(self, config, layer_idx: int, max_position: int, is_gemma2: bool,
                 quant_config=None, prefix: str = "") -> None:
        super().__init__(config, layer_idx, max_position, qkv_bias=False, qk_norm=False,
                         quant_config=quant_config, prefix=prefix)
        if getattr(config, "attention_bias", False):
            raise ValueError("Gemma with attention_bias=True is not supported")
        if is_gemma2:
            self.attn.scale = config.query_pre_attn_scalar ** -0.5
            self.attn.soft_cap = getattr(config, "attn_logit_softcapping", None)
            self.attn.sliding_window = _gemma2_window(config, layer_idx)
        else:
            self.attn.sliding_window = None


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, is_gemma2: bool,
                 quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer_idx, max_position, is_gemma2,
                                        quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, _activation(config),
                            quant_config=quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)
        self.is_gemma2 = is_gemma2
        if is_gemma2:
            self.pre_feedforward_layernorm = _norm(config)
            self.post_feedforward_layernorm = _norm(config)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        """Returns (block output, residual stream); the caller's next norm adds them."""
        hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        if not self.is_gemma2:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden, ctx.lora), residual
        hidden = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden, ctx.lora)), residual


class GemmaModel(LlamaModel):
    """Llama's pipeline-staged stack with Gemma's layers, ``1 + weight`` final norm and
    scaled embedding."""

    def __init__(self, config, max_position: int, tied: bool, is_gemma2: bool,
                 quant_config=None) -> None:
        super().__init__(config, max_position, tied, quant_config, is_gemma2=is_gemma2)
        self.embed_scale = config.hidden_size ** 0.5

    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return GemmaDecoderLayer(config, layer_idx, max_position, kwargs["is_gemma2"],
                                 self.quant_config, f"{self.prefix}.layers.{layer_idx}")

    def make_norm(self, config) -> nn.Module:
        return _norm(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # the scale is rounded to the model dtype before multiplying, as in HF
        return hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    """Llama's causal LM (tensor and pipeline parallel) with Gemma's model; Gemma 2 adds the
    final logit soft-cap."""
    is_gemma2 = False
    tied_by_default = True
    supports_prompt_adapters = False  # its embed() scales the token embeddings
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__(config, max_position, quant_config)
        if self.is_gemma2:
            self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def make_model(self, config, max_position: int) -> nn.Module:
        return GemmaModel(config, max_position, self.tie_word_embeddings, self.is_gemma2,
                          self.quant_config)


class Gemma2ForCausalLM(GemmaForCausalLM):
    is_gemma2 = True
    supports_quantization = True
