"""GPT-2 (openai-community/gpt2 and fine-tunes).

What differs from Llama:
- learned absolute position embeddings ``wpe`` added to ``wte``; no rotary embedding;
- LayerNorm (with bias, ``layer_norm_epsilon``) pre-LN blocks ``ln_1``/``ln_2`` and ``ln_f``;
- one fused ``c_attn`` (q|k|v, with bias) and ``c_proj``; every head is a KV head;
- attention scale ``head_dim ** -0.5`` if ``scale_attn_weights``, further divided by
  ``layer_idx + 1`` if ``scale_attn_by_inverse_layer_idx``;
- a plain MLP ``c_fc`` -> ``gelu_new`` -> ``c_proj`` (width ``n_inner`` or 4 x hidden);
- checkpoint weights are HF ``Conv1D`` ``[in, out]``: the loader attached to each such
  parameter transposes them into ``Linear``'s ``[out, in]``;
- the LM head is tied to ``wte``; keys come with or without the ``transformer.`` prefix and
  the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are skipped.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.linear import Linear, VocabEmbedding, default_weight_loader
from pagedllm.distributed import (is_first_stage, is_last_stage, recv_from_prev_stage,
                                  send_to_next_stage)
from pagedllm.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                      RowParallelLinear, VocabParallelEmbedding,
                                      stage_layer_list)
from pagedllm.layers.logits import pipeline_logits
from pagedllm.models.utils import load_weights


def _conv1d(layer: Linear) -> Linear:
    """Mark ``layer``'s weight as stored transposed in checkpoints: HF Conv1D stores
    ``[in, out]``, Linear keeps ``[out, in]``; the layer's own (sharding) loader follows.
    A quantized layer without a dense ``weight`` (GPTQ ``qweight``) or with an integer one
    (bitsandbytes 4-bit codes, 8-bit int8: transformers quantizes Conv1D weights as
    ``[out, in]``) is left as it is: those formats store Conv1D layers in their own layout."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dtype in (torch.uint8, torch.int8):
        return layer
    inner = getattr(layer.weight, "weight_loader", default_weight_loader)

    def load(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        inner(param, loaded.t() if loaded.dim() == 2 else loaded, name)

    layer.weight.weight_loader = load
    return layer


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        scale = self.head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.c_attn = _conv1d(QKVParallelLinear(hidden, self.head_dim, self.num_heads,
                                                self.num_heads, bias=True,
                                                quant_config=quant_config,
                                                prefix=f"{prefix}.c_attn"))
        self.c_proj = _conv1d(RowParallelLinear(hidden, hidden, bias=True,
                                                quant_config=quant_config,
                                                prefix=f"{prefix}.c_proj"))
        self.num_heads = self.c_attn.num_heads  # this rank's heads
        self.attn = Attention(layer_idx, self.num_heads, self.num_heads, self.head_dim, scale)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.c_attn.split(self.c_attn(hidden))
        return self.c_proj(self.attn(q, k, v, ctx))


class GPT2MLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = _conv1d(ColumnParallelLinear(config.hidden_size, inner, bias=True,
                                                 quant_config=quant_config,
                                                 prefix=f"{prefix}.c_fc"))
        self.c_proj = _conv1d(RowParallelLinear(inner, config.hidden_size, bias=True,
                                                quant_config=quant_config,
                                                prefix=f"{prefix}.c_proj"))
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx, quant_config, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # hidden [num_tokens, hidden_size]
        hidden = hidden + self.attn(self.ln_1(hidden), ctx)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    """Pipeline stages: the first adds token and position embeddings, each runs its
    contiguous blocks and sends the hidden states on, the last applies ``ln_f``; the tied LM
    head keeps ``wte`` on the last stage too."""

    def __init__(self, config, max_position: int, tied: bool, quant_config=None,
                 prefix: str = "transformer") -> None:
        super().__init__()
        first, last = is_first_stage(), is_last_stage()
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        self.wte = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                    if first or (tied and last) else None)
        self.wpe = (VocabEmbedding(config.max_position_embeddings, config.hidden_size)
                    if first else None)
        self.stage_layers, self.h = stage_layer_list(
            config.num_hidden_layers,
            lambda i: GPT2Block(config, i, quant_config, f"{prefix}.h.{i}"))
        self.ln_f = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
                     if last else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden = self.wte(input_ids) + self.wpe(positions)
        else:
            hidden = recv_from_prev_stage((input_ids.shape[0], self.hidden_size), self.dtype,
                                          input_ids.device)
        for i in self.stage_layers:
            hidden = self.h[i](hidden, ctx)
        if not is_last_stage():
            send_to_next_stage(hidden, ctx.sends)
            return hidden
        return self.ln_f(hidden)


def _rename(name: str) -> str | None:
    """Add the ``transformer.`` prefix bare GPT-2 checkpoints lack; drop mask buffers."""
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


class GPT2LMHeadModel(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.transformer = GPT2Model(config, max_position, self.tie_word_embeddings,
                                     quant_config)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if not self.tie_word_embeddings and is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.transformer.wte if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        return load_weights(self, weights, skip=skip, rename=_rename)
