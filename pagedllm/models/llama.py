"""Llama-family decoders: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

Module names follow Hugging Face so checkpoint keys line up; q/k/v and gate/up are fused into
``qkv_proj`` and ``gate_up_proj`` (one matmul each) by their layers' weight loaders.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import ActAndMul
from pagedllm.layers.linear import NO_LORA_GIVEN, NoLoRAGiven
from pagedllm.distributed import (is_first_stage, is_last_stage, recv_from_prev_stage,
                                  send_to_next_stage)
from pagedllm.layers.parallel import (MergedColumnParallelLinear, ParallelLMHead,
                                      QKVParallelLinear, RowParallelLinear,
                                      VocabParallelEmbedding, stage_layer_list)
from pagedllm.layers.logits import pipeline_logits
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import get_rope
from pagedllm.models.utils import load_weights, tie_or_skip

if TYPE_CHECKING:
    from pagedllm.worker.lora import LoRABatch

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
                 qk_norm: bool, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_kv_heads, bias=qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size,
                                        bias=bool(getattr(config, "attention_bias", False)),
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        # this rank's heads (all of them at tensor-parallel size 1)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = get_rope(config, self.head_dim, max_position)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim ** -0.5, layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden, lora=ctx.lora))
        # q/k norms and rotary happen in the attention layer (fused with the KV write on CUDA)
        return self.o_proj(self.attn(q, k, v, ctx, positions, self.rotary_emb, self.q_norm,
                                     self.k_norm), lora=ctx.lora)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 bias: bool = False, *, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias,
                                           quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = ActAndMul(act)

    def forward(self, x: torch.Tensor,
                lora: LoRABatch | None | NoLoRAGiven = NO_LORA_GIVEN) -> torch.Tensor:
        """``lora``: the forward's ``ForwardContext.lora`` (its projections are LoRA
        targets; a caller that holds no context, e.g. a shared expert, passes nothing)."""
        if self.act_fn.is_silu:  # one kernel for gate/up and SiLU on one-token CUDA steps
            return self.down_proj(self.gate_up_proj(x, gated_silu=True, lora=lora), lora=lora)
        return self.down_proj(self.act_fn(self.gate_up_proj(x, lora=lora)), lora=lora)


def feed_forward(mlp: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """A decoder layer's ``mlp`` on ``x``: a ``LlamaMLP`` (LoRA targets) gets the forward's
    LoRA batch; MoE blocks and other MLPs hold no LoRA slots."""
    return mlp(x, lora=ctx.lora) if isinstance(mlp, LlamaMLP) else mlp(x)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, *, quant_config=None,
                 prefix: str = "", **attn_kwargs) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, max_position, **attn_kwargs,
                                        quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            getattr(config, "mlp_bias", False), quant_config=quant_config,
                            prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        hidden, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return feed_forward(self.mlp, hidden, ctx), residual


class LlamaModel(nn.Module):
    """The decoder stack, split into pipeline stages: the first embeds (the last holds the
    embedding too when the LM head is tied to it), each runs its contiguous layers and sends
    the hidden states and residual on, the last applies the final norm. Subclasses (Gemma)
    change the layer, the norm or the embedding through ``make_layer``, ``make_norm`` and
    ``embed``. ``quant_config`` and ``prefix`` (the stack's checkpoint name) reach every
    linear layer that ``make_layer`` builds."""

    def __init__(self, config, max_position: int, tied: bool, quant_config=None,
                 prefix: str = "model", **layer_kwargs) -> None:
        super().__init__()
        self.quant_config, self.prefix = quant_config, prefix
        self.hidden_size, self.dtype = config.hidden_size, torch.get_default_dtype()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size)
                             if is_first_stage() or (tied and is_last_stage()) else None)
        self.stage_layers, self.layers = stage_layer_list(
            config.num_hidden_layers,
            lambda i: self.make_layer(config, i, max_position, **layer_kwargs))
        self.norm = self.make_norm(config) if is_last_stage() else None

    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return LlamaDecoderLayer(config, layer_idx, max_position, quant_config=self.quant_config,
                                 prefix=f"{self.prefix}.layers.{layer_idx}", **kwargs)

    def make_norm(self, config) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        if is_first_stage():
            hidden, residual = self.embed(input_ids), None
            if ctx.embed_overrides is not None:  # soft prompts (LlamaForCausalLM family only)
                rows, values = ctx.embed_overrides
                hidden = hidden.index_copy(0, rows, values.to(hidden.dtype))
        else:  # hidden states and residual of the previous stage, side by side
            hidden, residual = recv_from_prev_stage(
                (input_ids.shape[0], 2 * self.hidden_size), self.dtype,
                input_ids.device).chunk(2, dim=-1)
        for i in self.stage_layers:
            hidden, residual = self.layers[i](positions, hidden, residual, ctx)
        if not is_last_stage():
            send_to_next_stage(torch.cat([hidden, residual], dim=-1), ctx.sends)
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    supports_prompt_adapters = True  # token embeddings are not scaled (Gemma's are)
    supports_quantization = True  # declared per class (a subclass may add MoE layers)
    qkv_bias = False
    qk_norm = False
    tied_by_default = False  # tie_word_embeddings when the config lacks it

    def __init__(self, config, max_position: int, quant_config=None) -> None:
        super().__init__()
        self.config, self.quant_config = config, quant_config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings",
                                                self.tied_by_default))
        self.model = self.make_model(config, max_position)
        # untied: the last stage's own head; tied: the embedding (None off the last stage)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size)
                        if not self.tie_word_embeddings and is_last_stage() else None)
        self.final_soft_cap: float | None = None

    def make_model(self, config, max_position: int) -> nn.Module:
        return LlamaModel(config, max_position, self.tie_word_embeddings, self.quant_config,
                          qkv_bias=self._qkv_bias(config), qk_norm=self.qk_norm)

    def _qkv_bias(self, config) -> bool:
        return self.qkv_bias or bool(getattr(config, "attention_bias", False))

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.embed_tokens if self.tie_word_embeddings else self.lm_head
        return pipeline_logits(hidden, head, self.config.vocab_size, self.final_soft_cap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings))


class MistralForCausalLM(LlamaForCausalLM):
    supports_quantization = True


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    supports_quantization = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    supports_quantization = True
