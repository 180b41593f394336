"""GPT-J (EleutherAI/gpt-j-6b and fine-tunes).

What differs from Llama:
- one LayerNorm ``ln_1`` (with bias) per block, whose output feeds attention and the MLP
  in parallel: ``x + attn(ln_1(x)) + mlp(ln_1(x))``; the final norm is ``ln_f``;
- q/k/v (fused into ``qkv_proj`` on load) and ``out_proj`` without bias;
- rotary on the first ``rotary_dim`` dims of each head in GPT-J's interleaved layout
  (pairs of adjacent dims rotate together, ``rotate_every_two``; not neox's halves), base
  10000;
- a plain MLP ``fc_in`` -> ``activation_function`` (``gelu_new``) -> ``fc_out`` with biases;
- an untied LM head with a bias.
Checkpoints' causal-mask buffers and position tables are skipped. Tensor and pipeline
parallel through ``HiddenStack``.
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
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.stack import HiddenStack
from pagedllm.models.utils import load_weights

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
           ("qkv_proj", "v_proj", "v")]
_BUFFERS = (".attn.bias", ".attn.masked_bias", "embed_positions", "rotary_emb.inv_freq")


class GPTJAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        heads, hidden = config.num_attention_heads, config.hidden_size
        self.head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.out_proj = RowParallelLinear(hidden, hidden, quant_config=quant_config,
                                          prefix=f"{prefix}.out_proj")
        rotary_dim = getattr(config, "rotary_dim", None) or self.head_dim
        max_position = max(max_position, config.max_position_embeddings)
        self.rotary_emb = RotaryEmbedding(self.head_dim, rotary_dim, max_position,
                                          rope_parameters(config), is_neox_style=False)
        local = self.qkv_proj.num_heads  # this rank's heads
        self.attn = Attention(layer_idx, local, local, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        return self.out_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb))


class GPTJMLP(nn.Module):
    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * hidden
        self.fc_in = ColumnParallelLinear(hidden, inner, True, quant_config=quant_config,
                                          prefix=f"{prefix}.fc_in")
        self.fc_out = RowParallelLinear(inner, hidden, True, quant_config=quant_config,
                                        prefix=f"{prefix}.fc_out")
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTJAttention(config, layer_idx, max_position, quant_config,
                                  f"{prefix}.attn")
        self.mlp = GPTJMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        normed = self.ln_1(hidden)
        return hidden + self.attn(positions, normed, ctx) + self.mlp(normed)


class BiasedLMHead(ParallelLMHead):
    """A vocabulary-parallel LM head plus a bias over the whole vocabulary (replicated)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.bias = nn.Parameter(torch.zeros(num_embeddings), requires_grad=False)


class GPTJForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config = config
        if getattr(config, "tie_word_embeddings", False):
            raise ValueError("GPTJForCausalLM with tie_word_embeddings=true is not supported: "
                             "GPT-J's LM head has its own weight and bias")
        self.transformer = HiddenStack(
            config, False,
            lambda i: GPTJBlock(config, i, max_position, quant_config, f"transformer.h.{i}"),
            lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            names=("wte", "h", "ln_f"))
        self.lm_head = (BiasedLMHead(config.vocab_size, config.hidden_size)
                        if is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.lm_head.bias if self.lm_head is not None else None
        return pipeline_logits(hidden, self.lm_head, self.config.vocab_size, bias=bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, skip=_BUFFERS)
