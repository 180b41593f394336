"""GPT-NeoX (EleutherAI/pythia-*, gpt-neox-20b and fine-tunes).

What differs from Llama:
- LayerNorm (with bias, ``layer_norm_eps``) pre-LN blocks; the final one is
  ``final_layer_norm``; the embedding is ``embed_in``, the (untied) head ``embed_out``
  (transformers 5 renames it ``lm_head``; both load);
- one fused ``query_key_value`` projection whose rows are interleaved per head
  (``[head][q|k|v][head_dim]``), with bias: its loader de-interleaves it into the q/k/v
  layout of ``QKVParallelLinear`` so tensor parallelism splits whole heads;
- rotary on the first ``rotary_pct`` (``partial_rotary_factor``) of each head, neox style;
- a plain MLP ``dense_h_to_4h`` -> ``hidden_act`` -> ``dense_4h_to_h`` with biases;
- ``use_parallel_residual``: ``x + attn(ln1(x)) + mlp(ln2(x))``; else sequential blocks.
Checkpoints' causal-mask buffers (``attention.bias``, ``attention.masked_bias``) and
``rotary_emb.inv_freq`` are skipped. Tensor and pipeline parallel like GPT-2.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.distributed import (is_first_stage, is_last_stage, recv_from_prev_stage,
                                  send_to_next_stage)
from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.logits import pipeline_logits
from pagedllm.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                      RowParallelLinear, VocabParallelEmbedding,
                                      stage_layer_list)
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.utils import load_weights


def _per_head_interleaved(layer: QKVParallelLinear, num_heads: int, head_dim: int) -> None:
    """Make ``layer``'s weight and bias load from NeoX's per-head ``[q|k|v]`` row order:
    each of q, k, v is gathered (all heads) and handed to the layer's own shard loader."""
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        inner = param.weight_loader

        def load(param, loaded: torch.Tensor, name: str = "", inner=inner) -> None:
            rest = tuple(loaded.shape[1:])
            per_head = loaded.reshape(num_heads, 3, head_dim, *rest)
            for i, shard in enumerate(("q", "k", "v")):
                inner(param, per_head[:, i].reshape(num_heads * head_dim, *rest), name, shard)

        param.weight_loader = load


def neox_rotary(config, head_dim: int, max_position: int) -> RotaryEmbedding:
    params = rope_parameters(config)
    fraction = params.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    max_position = max(max_position, getattr(config, "max_position_embeddings", max_position))
    return RotaryEmbedding(head_dim, int(head_dim * fraction), max_position, params)


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int) -> None:
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        self.head_dim = hidden // heads
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=bias)
        _per_head_interleaved(self.query_key_value, heads, self.head_dim)
        self.dense = RowParallelLinear(hidden, hidden, bias=bias)
        self.rotary_emb = neox_rotary(config, self.head_dim, max_position)
        local = self.query_key_value.num_heads  # this rank's heads
        self.attn = Attention(layer_idx, local, local, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.query_key_value.split(self.query_key_value(hidden))
        return self.dense(self.attn(q, k, v, ctx, positions, self.rotary_emb))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size,
                                                  bias=True)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                               bias=True)
        self.act = get_act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int) -> None:
        super().__init__()
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", True))
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx, max_position)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(hidden), ctx)
        if self.use_parallel_residual:
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GPTNeoXModel(nn.Module):
    """Pipeline stages as GPT-2's: the first embeds, each runs its contiguous layers and
    sends the hidden states on, the last applies ``final_layer_norm``."""

    def __init__(self, config, max_position: int, tied: bool) -> None:
        super().__init__()
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        self.embed_in = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                         if is_first_stage() or (tied and is_last_stage()) else None)
        self.stage_layers, self.layers = stage_layer_list(
            config.num_hidden_layers, lambda i: GPTNeoXLayer(config, i, max_position))
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                                 if is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden = self.embed_in(input_ids)
        else:
            hidden = recv_from_prev_stage((input_ids.shape[0], self.hidden_size), self.dtype,
                                          input_ids.device)
        for i in self.stage_layers:
            hidden = self.layers[i](positions, hidden, ctx)
        if not is_last_stage():
            send_to_next_stage(hidden, ctx.sends)
            return hidden
        return self.final_layer_norm(hidden)


def _rename(name: str) -> str | None:
    """``embed_out`` (hub) is transformers 5's ``lm_head``; mask and rotary buffers go."""
    if name.endswith((".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")):
        return None
    return "lm_head." + name[len("embed_out."):] if name.startswith("embed_out.") else name


class GPTNeoXForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.gpt_neox = GPTNeoXModel(config, max_position, self.tie_word_embeddings)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if not self.tie_word_embeddings and is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.gpt_neox.embed_in if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        return load_weights(self, weights, skip=skip, rename=_rename)
