"""Cohere Command-R / Command-R+ (CohereForAI/c4ai-command-r-v01, -plus, Aya 23, ...).

What differs from Llama:
- LayerNorms (mean-subtracting, weight only, ``layer_norm_eps``) where Llama has RMSNorms;
- one norm per block feeding attention and the MLP in parallel:
  ``x + attn(ln(x)) + mlp(ln(x))``;
- rotary in the interleaved layout (adjacent dims rotate together, not neox halves);
- ``use_qk_norm`` (Command-R+): per-head LayerNorms of q and k before rotary, each head
  with its own weight row (``q_norm.weight`` is ``[heads, head_dim]``; tensor-parallel
  ranks keep their heads' rows);
- logits multiplied by ``logit_scale``; the LM head is tied to the embedding by default.
Tensor and pipeline parallel through ``HiddenStack``; quant prefixes as Llama's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.distributed import is_last_stage
from pagedllm.layers.logits import pipeline_logits
from pagedllm.layers.parallel import ParallelLMHead
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.models.llama import STACKED, LlamaAttention, LlamaMLP
from pagedllm.models.stack import HiddenStack
from pagedllm.models.utils import load_weights, tie_or_skip


def _layer_norm(config) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)


class HeadLayerNorm(nn.Module):
    """LayerNorm over each head's ``head_dim`` with one weight row per head; this rank holds
    heads ``[start, start + count)`` of the checkpoint's ``[heads, head_dim]`` weight."""

    def __init__(self, start: int, count: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.start, self.count, self.head_dim, self.eps = start, count, head_dim, eps
        self.weight = nn.Parameter(torch.ones(count, head_dim))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if loaded.dim() != 2 or loaded.shape[0] < self.start + self.count \
                or loaded.shape[1] != self.head_dim:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects heads [{self.start}, {self.start + self.count}) of "
                             f"[heads, {self.head_dim}]")
        param.data.copy_(loaded[self.start:self.start + self.count])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.view(x.shape[0], self.count, self.head_dim).float()
        heads = F.layer_norm(heads, (self.head_dim,), None, None, self.eps)
        return (heads * self.weight.float()).to(x.dtype).view(x.shape)


class CohereAttention(LlamaAttention):
    """Llama's attention with interleaved rotary and optional per-head q/k LayerNorms
    (applied here, before the attention layer's rotary)."""

    def __init__(self, config, layer_idx: int, max_position: int, **kwargs) -> None:
        super().__init__(config, layer_idx, max_position, qkv_bias=bool(config.attention_bias),
                         qk_norm=False, **kwargs)
        max_position = max(max_position, config.max_position_embeddings)
        self.rotary_emb = RotaryEmbedding(self.head_dim, self.head_dim, max_position,
                                          rope_parameters(config), is_neox_style=False)
        self.q_norm = self.k_norm = None
        if getattr(config, "use_qk_norm", False):
            qkv, eps = self.qkv_proj, config.layer_norm_eps
            self.q_norm = HeadLayerNorm(qkv.q_start, qkv.num_heads, self.head_dim, eps)
            self.k_norm = HeadLayerNorm(qkv.kv_start, qkv.num_kv_heads, self.head_dim, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, lora=ctx.lora))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb), lora=ctx.lora)


class CohereDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        self.input_layernorm = _layer_norm(config)
        self.self_attn = CohereAttention(config, layer_idx, max_position,
                                         quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        return hidden + self.self_attn(positions, normed, ctx) + self.mlp(normed, ctx.lora)


class CohereForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.logit_scale = float(getattr(config, "logit_scale", None) or 1.0)
        self.model = HiddenStack(
            config, self.tie_word_embeddings,
            lambda i: CohereDecoderLayer(config, i, max_position, quant_config,
                                         f"model.layers.{i}"),
            lambda: _layer_norm(config))
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if not self.tie_word_embeddings and is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embedding if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size, scale=self.logit_scale)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings))
