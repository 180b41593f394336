"""Falcon (tiiuae/falcon-7b, -40b, -180b, Falcon2-11B and fine-tunes).

What differs from Llama:
- LayerNorm (with bias, ``layer_norm_epsilon``); the LM head is tied to
  ``word_embeddings`` by default; linear layers have a bias only when ``bias``;
- one fused ``query_key_value`` whose row order depends on the architecture flags:
  ``new_decoder_architecture`` (40b/180b): grouped per KV head, ``[kv][q.. | k | v][head]``;
  else ``multi_query`` (7b): all q heads, then one k and one v head; else (rw-1b style)
  per-head interleaved ``[head][q|k|v]``. The loader puts each into q/k/v order so tensor
  parallelism splits whole heads (the single KV head of multi-query is replicated);
- the blocks: new architecture: ``x + attn(ln_attn(x)) + mlp(ln_mlp(x))`` (one shared
  ``input_layernorm`` when ``num_ln_in_parallel_attn`` is 1); old with ``parallel_attn``:
  ``x + attn(ln(x)) + mlp(ln(x))``; old sequential: GPT-2 style pre-LN blocks;
- a plain MLP ``dense_h_to_4h`` -> ``activation`` -> ``dense_4h_to_h``;
- position information from neox-style rotary; ALiBi (``alibi: true``, e.g.
  falcon-rw-1b) is not supported by the paged attention kernels: start-up error.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.distributed import is_last_stage
from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.logits import pipeline_logits
from pagedllm.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.rotary import get_rope
from pagedllm.models.stack import HiddenStack
from pagedllm.models.utils import fused_qkv_layout, grouped_qkv_splitter, load_weights


def _num_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads or config.num_attention_heads
    return 1 if config.multi_query else config.num_attention_heads


def _qkv_splitter(config, head_dim: int):
    """``split(rows, div)`` for ``fused_qkv_layout``: Falcon's three row orders."""
    heads, kv = config.num_attention_heads, _num_kv_heads(config)
    if config.new_decoder_architecture:  # [kv group][q heads of the group, k, v]
        return grouped_qkv_splitter(heads, kv, head_dim)

    def split(rows: torch.Tensor, div: int):
        rest, per_head = tuple(rows.shape[1:]), head_dim // div
        if config.multi_query:  # [q heads | k | v]
            return rows.split([heads * per_head, per_head, per_head], dim=0)
        interleaved = rows.reshape(heads, 3, per_head, *rest)  # [head][q|k|v]
        return tuple(interleaved[:, i].reshape(heads * per_head, *rest) for i in range(3))

    return split


class FalconAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        self.head_dim = hidden // heads
        bias = bool(config.bias)
        self.query_key_value = QKVParallelLinear(
            hidden, self.head_dim, heads, _num_kv_heads(config), bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.query_key_value")
        fused_qkv_layout(self.query_key_value, _qkv_splitter(config, self.head_dim))
        self.dense = RowParallelLinear(hidden, hidden, bias=bias, quant_config=quant_config,
                                       prefix=f"{prefix}.dense")
        self.rotary_emb = get_rope(config, self.head_dim, max_position)
        qkv = self.query_key_value  # this rank's heads
        self.attn = Attention(layer_idx, qkv.num_heads, qkv.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5)

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.query_key_value.split(self.query_key_value(hidden))
        return self.dense(self.attn(q, k, v, ctx, positions, self.rotary_emb))


class FalconMLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden, bias = config.hidden_size, bool(config.bias)
        inner = getattr(config, "ffn_hidden_size", None) or 4 * hidden
        self.dense_h_to_4h = ColumnParallelLinear(hidden, inner, bias, quant_config=quant_config,
                                                  prefix=f"{prefix}.dense_h_to_4h")
        self.dense_4h_to_h = RowParallelLinear(inner, hidden, bias, quant_config=quant_config,
                                               prefix=f"{prefix}.dense_4h_to_h")
        self.act = get_act_fn(getattr(config, "activation", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


def _norm_names(config) -> tuple[str, ...]:
    """The layer's LayerNorms, as the checkpoint names them."""
    if config.new_decoder_architecture:
        two = (getattr(config, "num_ln_in_parallel_attn", None) or 2) == 2
        return ("ln_attn", "ln_mlp") if two else ("input_layernorm",)
    if config.parallel_attn:
        return ("input_layernorm",)
    return ("input_layernorm", "post_attention_layernorm")


class FalconDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        self.norm_names = _norm_names(config)
        for name in self.norm_names:
            setattr(self, name, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon))
        self.parallel = bool(config.new_decoder_architecture or config.parallel_attn)
        self.self_attention = FalconAttention(config, layer_idx, max_position, quant_config,
                                              f"{prefix}.self_attention")
        self.mlp = FalconMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        attn_norm = getattr(self, self.norm_names[0])
        attn_in = attn_norm(hidden)
        attn = self.self_attention(positions, attn_in, ctx)
        if not self.parallel:  # sequential pre-LN blocks
            hidden = hidden + attn
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        mlp_in = getattr(self, self.norm_names[1])(hidden) if len(self.norm_names) == 2 \
            else attn_in
        return hidden + attn + self.mlp(mlp_in)


def check_falcon_config(config) -> None:
    """ALiBi needs a bias in the attention kernels, which pagedllm does not have."""
    if getattr(config, "alibi", False):
        raise ValueError("FalconForCausalLM with alibi=true (ALiBi position biases, e.g. "
                         "falcon-rw-1b) is not supported: pagedllm's paged attention backends "
                         "have no ALiBi bias; Falcon models with rotary embeddings "
                         "(alibi=false: falcon-7b/40b/180b, Falcon2) are")


class FalconForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        check_falcon_config(config)
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.transformer = HiddenStack(
            config, self.tie_word_embeddings,
            lambda i: FalconDecoderLayer(config, i, max_position, quant_config,
                                         f"transformer.h.{i}"),
            lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            names=("word_embeddings", "h", "ln_f"))
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if not self.tie_word_embeddings and is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.transformer.embedding if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tie_word_embeddings
                                          else ())
        return load_weights(self, weights, skip=skip)
