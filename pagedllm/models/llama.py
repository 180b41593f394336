"""Llama-family decoders: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

Module names follow Hugging Face so checkpoint keys line up; q/k/v and gate/up are fused into
``qkv_proj`` and ``gate_up_proj`` (one matmul each) by their layers' weight loaders.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import ActAndMul
from pagedllm.distributed import (broadcast_from_last_stage, is_first_stage, is_last_stage,
                                  recv_from_prev_stage, send_to_next_stage, stage_layers)
from pagedllm.layers.parallel import (MergedColumnParallelLinear, ParallelLMHead,
                                      PPMissingLayer, QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, skip_other_stages)
from pagedllm.layers.logits import compute_logits
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import get_rope
from pagedllm.models.utils import load_weights, tie_or_skip

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"),
           ("qkv_proj", "v_proj", "v"), ("gate_up_proj", "gate_proj", "gate"),
           ("gate_up_proj", "up_proj", "up")]


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The window of one layer: per ``layer_types`` when the config has them, else global."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, *, qkv_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size,
                                        bias=bool(getattr(config, "attention_bias", False)))
        # this rank's heads (all of them at tensor-parallel size 1)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = get_rope(config, self.head_dim, max_position)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5, layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        n = hidden.shape[0]
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, ctx))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, {"gate": intermediate_size,
                                                                     "up": intermediate_size},
                                                       bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act_fn = ActAndMul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, **attn_kwargs) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, max_position, **attn_kwargs)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_position: int, **attn_kwargs) -> None:
        super().__init__()
        # pipeline stages: the first embeds (the last too when the LM head is tied), each
        # runs its contiguous layers, the last applies the final norm
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if is_first_stage() or (tied and is_last_stage()) else None)
        self.stage_layers = stage_layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, max_position, **attn_kwargs)
            if i in self.stage_layers else PPMissingLayer()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last_stage() else None

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden, residual = self.embed_tokens(input_ids), None
        else:  # hidden states and residual of the previous stage, side by side
            hidden, residual = recv_from_prev_stage(
                (input_ids.shape[0], 2 * self.hidden_size), self.dtype,
                input_ids.device).chunk(2, dim=-1)
        for i in self.stage_layers:
            hidden, residual = self.layers[i](positions, hidden, residual, ctx)
        if not is_last_stage():
            send_to_next_stage(torch.cat([hidden, residual], dim=-1))
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    qkv_bias = False
    qk_norm = False

    def __init__(self, config, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, qkv_bias=self._qkv_bias(config),
                                qk_norm=self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings and is_last_stage():
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def _qkv_bias(self, config) -> bool:
        return self.qkv_bias or bool(getattr(config, "attention_bias", False))

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = None
        if is_last_stage():  # other pipeline stages receive the last stage's logits
            head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
            logits = compute_logits(hidden, head.weight)
        return broadcast_from_last_stage(logits, (hidden.shape[0], self.config.vocab_size),
                                         torch.float32, hidden.device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, skip_other_stages(self, weights), STACKED,
                            tie_or_skip(self.tie_word_embeddings))


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
