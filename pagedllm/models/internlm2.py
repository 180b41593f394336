"""InternLM2 / InternLM2.5 (internlm/internlm2-*, internlm2_5-*; remote-code checkpoints,
``--trust-remote-code`` loads their config).

Llama's decoder under other names, with one packed projection:
- ``attention.wqkv`` holds q, k and v grouped per KV head, ``[kv head][its q heads | k | v]
  [head_dim]`` (the checkpoint's ``(h gs d)`` layout with ``gs = q heads per KV head + 2``);
  the loader reorders it into q/k/v so tensor parallelism splits whole KV groups;
  ``attention.wo`` is the output projection; both have a bias when ``bias``;
- ``feed_forward.w1`` (gate) and ``w3`` (up) are fused into one matmul, ``w2`` is down;
- ``attention_norm`` / ``ffn_norm`` are the RMSNorms before attention / the MLP;
- ``model.tok_embeddings`` is the embedding and ``output`` the (untied) LM head.
Rotary (neox style, ``rope_theta``, linear or dynamic ``rope_scaling``) as Llama's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import ActAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.parallel import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.rotary import get_rope
from pagedllm.models.llama import LlamaForCausalLM, LlamaModel
from pagedllm.models.utils import (
    fused_qkv_layout,
    grouped_qkv_splitter,
    load_weights,
    tie_or_skip,
)

STACKED = [("gate_up_proj", "w1", "gate"), ("gate_up_proj", "w3", "up")]
_RENAMES = (("model.tok_embeddings.", "model.embed_tokens."), ("output.", "lm_head."))


class InternLM2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = config.hidden_size // heads
        bias = bool(getattr(config, "bias", False))
        self.wqkv = QKVParallelLinear(config.hidden_size, self.head_dim, heads, kv_heads,
                                      bias=bias, quant_config=quant_config,
                                      prefix=f"{prefix}.wqkv")
        fused_qkv_layout(self.wqkv, grouped_qkv_splitter(heads, kv_heads, self.head_dim))
        self.wo = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=bias,
                                    quant_config=quant_config, prefix=f"{prefix}.wo")
        self.rotary_emb = get_rope(config, self.head_dim, max_position)
        self.attn = Attention(layer_idx, self.wqkv.num_heads, self.wqkv.num_kv_heads,
                              self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.wqkv.split(self.wqkv(hidden))
        return self.wo(self.attn(q, k, v, ctx, positions, self.rotary_emb))


class InternLM2MLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, {"gate": size, "up": size}, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj")
        self.w2 = RowParallelLinear(size, config.hidden_size, quant_config=quant_config,
                                    prefix=f"{prefix}.w2")
        self.act_fn = ActAndMul(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fn.is_silu:
            return self.w2(self.gate_up_proj(x, gated_silu=True))
        return self.w2(self.act_fn(self.gate_up_proj(x)))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx, max_position, quant_config,
                                            f"{prefix}.attention")
        self.feed_forward = InternLM2MLP(config, quant_config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        hidden, residual = self.attention_norm.add_norm(hidden, residual)
        hidden = self.attention(positions, hidden, ctx)
        hidden, residual = self.ffn_norm(hidden, residual)
        return self.feed_forward(hidden), residual


class InternLM2Model(LlamaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return InternLM2DecoderLayer(config, layer_idx, max_position, self.quant_config,
                                     f"{self.prefix}.layers.{layer_idx}")


def _rename(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class InternLM2ForCausalLM(LlamaForCausalLM):
    supports_quantization = True

    def make_model(self, config, max_position: int) -> nn.Module:
        return InternLM2Model(config, max_position, self.tie_word_embeddings, self.quant_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings),
                            rename=_rename)
