"""Pooling (embedding / reward) models: a decoder stack whose final hidden states are pooled
per prompt instead of sampled (vLLM 0.6.3's embedding models).

* ``MistralModel`` / ``LlamaModel`` (e5-mistral-style checkpoints saved from the bare stack):
  last token, L2-normalised;
* ``Gemma2Model``: the same pooling over Gemma 2's stack;
* ``Qwen2ForRewardModel`` (Qwen2.5-Math-RM): a score head ``Linear -> ReLU -> Linear(1)`` on
  every token, pooled as all rows, not normalised (one reward per prompt token).

The stacks are llama.py's and gemma.py's; checkpoints saved from the bare model carry no
``model.`` prefix, so ``load_weights`` adds it. The runner calls ``forward`` and hands the
rows a prompt needs to ``pooler`` (``pagedllm/layers/pooler.py``); there is no LM head.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.layers.pooler import Pooler, PoolingType
from pagedllm.models.gemma import GemmaModel
from pagedllm.models.llama import STACKED, LlamaModel
from pagedllm.models.utils import load_weights


def _with_model_prefix(name: str) -> str | None:
    """Checkpoint name -> parameter name: the bare stack's tensors live under ``model.``;
    an LM head some checkpoints still carry is not used."""
    if name.startswith("lm_head."):
        return None
    return name if name.startswith(("model.", "score.")) else f"model.{name}"


class LlamaEmbeddingModel(nn.Module):
    """The Llama / Mistral stack, last-token pooling, L2-normalised."""
    supports_quantization = True
    qkv_bias = False
    pooler = Pooler(PoolingType.LAST, normalize=True)  # stateless: one per class

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config, self.quant_config = config, quant_config
        self.model = self.make_model(config, max_position)

    def make_model(self, config, max_position: int) -> nn.Module:
        return LlamaModel(config, max_position, False, self.quant_config,
                          qkv_bias=self.qkv_bias or bool(getattr(config, "attention_bias", False)),
                          qk_norm=False)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)  # [num_tokens, hidden_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, ("rotary_emb.inv_freq",),
                            rename=_with_model_prefix)


class Gemma2EmbeddingModel(LlamaEmbeddingModel):
    """Gemma 2's stack (scaled embedding, sandwich norms), last-token pooling, normalised."""

    def make_model(self, config, max_position: int) -> nn.Module:
        return GemmaModel(config, max_position, False, True, self.quant_config)


class Qwen2ForRewardModel(LlamaEmbeddingModel):
    """Qwen2's stack (qkv bias) and a per-token score head; every row pooled, unnormalised."""
    qkv_bias = True
    supports_quantization = False  # the score head is plain nn.Linear
    pooler = Pooler(PoolingType.ALL, normalize=False)

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__(config, max_position, quant_config)
        hidden = config.hidden_size
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.score(self.model(input_ids, positions, ctx))  # [num_tokens, 1]
