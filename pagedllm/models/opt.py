"""OPT (facebook/opt-*): a GPT-style decoder with learned positions.

What differs from Llama:
- learned absolute position embeddings, looked up at ``position + 2`` (OPT's padding offset);
  no rotary embedding;
- LayerNorm (with bias) instead of RMSNorm; pre-LN when ``do_layer_norm_before`` (most sizes),
  post-LN otherwise (opt-350m, which also has no final LayerNorm);
- separate q/k/v projections with bias (fused here into ``qkv_proj``), output ``out_proj``;
  q is scaled by ``head_dim ** -0.5`` before the dot product, as in HF;
- a plain ReLU MLP ``fc1`` -> act -> ``fc2``, not gated;
- ``project_in`` / ``project_out`` when ``word_embed_proj_dim != hidden_size``;
- the LM head is tied to ``embed_tokens`` (of width ``word_embed_proj_dim``).
Pipeline stages pass only the hidden states (the residual is added inside each layer).
Checkpoint keys come with the ``model.`` prefix (HF saves) or without (``decoder.*``,
e.g. facebook/opt-125m); both load.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import get_act_fn
from pagedllm.layers.linear import Linear, VocabEmbedding
from pagedllm.distributed import (is_first_stage, is_last_stage, recv_from_prev_stage,
                                  send_to_next_stage)
from pagedllm.layers.parallel import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                      RowParallelLinear, VocabParallelEmbedding,
                                      stage_layer_list)
from pagedllm.layers.logits import pipeline_logits
from pagedllm.models.utils import load_weights

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
           ("qkv_proj", "v_proj", "v")]

# OPT looks positions up at ``position + 2`` (a leftover of its padding scheme).
POSITION_OFFSET = 2


def _layer_norm(config) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size,
                        elementwise_affine=getattr(config, "layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.num_heads, self.num_heads,
                                          bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.out_proj = RowParallelLinear(hidden, hidden, bias, quant_config=quant_config,
                                          prefix=f"{prefix}.out_proj")
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        # q is pre-scaled (HF's order of operations), so the kernel scale is 1
        self.attn = Attention(layer_idx, self.num_heads, self.num_heads, self.head_dim, 1.0)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        return self.out_proj(self.attn(q * self.scaling, k, v, ctx))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        bias = getattr(config, "enable_bias", True)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx, quant_config, f"{prefix}.self_attn")
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, bias,
                                        quant_config=quant_config, prefix=f"{prefix}.fc1")
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias,
                                     quant_config=quant_config, prefix=f"{prefix}.fc2")
        self.activation_fn = get_act_fn(config.activation_function)
        self.final_layer_norm = _layer_norm(config)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        # hidden [num_tokens, hidden_size]
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, ctx)
        if not self.do_layer_norm_before:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.activation_fn(self.fc1(hidden)))
        if not self.do_layer_norm_before:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    """Pipeline stages: the first embeds tokens and positions (and projects in), each runs
    its contiguous layers and sends the hidden states on, the last applies the final norm
    and projects out; the tied LM head keeps the embedding on the last stage too."""

    def __init__(self, config, max_position: int, tied: bool, quant_config=None,
                 prefix: str = "model.decoder") -> None:
        super().__init__()
        proj_dim, hidden = config.word_embed_proj_dim, config.hidden_size
        first, last = is_first_stage(), is_last_stage()
        self.hidden_size, self.dtype = hidden, torch.get_default_dtype()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, proj_dim)
                             if first or (tied and last) else None)
        self.embed_positions = (VocabEmbedding(config.max_position_embeddings
                                               + POSITION_OFFSET, hidden) if first else None)
        # project_in/out stay dense (as in vLLM): small, and next to the embedding
        self.project_in = Linear(proj_dim, hidden) if proj_dim != hidden and first else None
        self.project_out = Linear(hidden, proj_dim) if proj_dim != hidden and last else None
        has_final_norm = (config.do_layer_norm_before
                          and not getattr(config, "_remove_final_layer_norm", False))
        self.final_layer_norm = _layer_norm(config) if has_final_norm and last else None
        self.stage_layers, self.layers = stage_layer_list(
            config.num_hidden_layers,
            lambda i: OPTDecoderLayer(config, i, quant_config, f"{prefix}.layers.{i}"))

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden = self.project_in(hidden)
            hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        else:
            hidden = recv_from_prev_stage((input_ids.shape[0], self.hidden_size), self.dtype,
                                          input_ids.device)
        for i in self.stage_layers:
            hidden = self.layers[i](hidden, ctx)
        if not is_last_stage():
            send_to_next_stage(hidden, ctx.sends)
            return hidden
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class OPTModel(nn.Module):
    def __init__(self, config, max_position: int, tied: bool, quant_config=None) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, max_position, tied, quant_config)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.decoder(input_ids, positions, ctx)


def _rename(name: str) -> str:
    """``decoder.*`` (no ``model.`` prefix, as in facebook/opt-125m) -> ``model.decoder.*``."""
    return "model." + name if name.startswith("decoder.") else name


class OPTForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_quantization = True

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.model = OPTModel(config, max_position, self.tie_word_embeddings, quant_config)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
                        if not self.tie_word_embeddings and is_last_stage() else None)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.decoder.embed_tokens if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        return load_weights(self, weights, STACKED, skip, rename=_rename)
