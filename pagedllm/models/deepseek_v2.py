"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) + DeepSeekMoE.

Attention (``MLAAttention``, Hugging Face module names):
- queries: ``q_proj`` (``q_lora_rank`` None), or the low-rank ``q_a_proj`` -> RMSNorm
  ``q_a_layernorm`` -> ``q_b_proj``; per head ``qk_nope_head_dim`` + ``qk_rope_head_dim``;
- keys/values: ``kv_a_proj_with_mqa`` gives the latent ``c`` (``kv_lora_rank``, then RMSNorm
  ``kv_a_layernorm``) and one rope key ``k_pe`` shared by all heads; ``kv_b_proj`` expands
  ``c`` into each head's no-rope key and value (``v_head_dim``);
- the paged cache stores ``[c ; rotated k_pe]`` per token (``kv_cache_spec``), and attention
  runs in ``pagedllm/attention/mla.py``: prefills expand the cached latents, decodes use the
  absorbed form over the latent cache;
- RoPE on the rope dims only: interleaved pairs (V2 always; V3 unless ``rope_interleave`` is
  false); YaRN as DeepSeek configures it: cos/sin scaled by mscale / mscale_all_dim, and the
  softmax scale ``qk_head_dim^-0.5`` times ``yarn_mscale(factor, mscale_all_dim)^2``.
- tensor parallelism splits heads (``q_proj``/``q_b_proj``/``kv_b_proj`` column-parallel,
  ``o_proj`` row-parallel); the latent projections run on every rank and every rank caches
  the whole latent (it is per token, not per head).

Feed-forward: layers ``< first_k_dense_replace`` keep a dense MLP of ``intermediate_size``;
the others are DeepSeekMoE: ``n_routed_experts`` of ``moe_intermediate_size`` and
``n_shared_experts`` always-on experts (one dense MLP of ``n_shared_experts *
moe_intermediate_size``, ``shared_experts``). The router (``gate``, computed in fp32 as
Hugging Face does):
- V2: softmax; ``topk_method`` ``greedy`` or ``group_limited_greedy`` (the best
  ``topk_group`` of ``n_group`` groups by their best expert); weights times
  ``routed_scaling_factor``; renormalised first when ``norm_topk_prob`` (as vLLM does;
  released V2 configs set it false);
- V3: sigmoid; ``e_score_correction_bias`` added for choosing only; groups ranked by the
  sum of their best two; renormalised when ``norm_topk_prob``; times ``routed_scaling_factor``.

Checkpoints: V3's multi-token-prediction layers (``model.layers.<num_hidden_layers>...``) are
not used and are skipped. On CUDA with the fused ops the decode attention and the latent
write are Triton kernels (``attention/triton_mla.py``) and CUDA graphs capture decode steps;
with ``PAGEDLLM_DISABLE_FUSED_OPS`` the PyTorch path runs and graphs stay off
(``supports_cuda_graphs``: its ``index_copy_`` cannot skip the padding rows' slot -1).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.backend import ForwardContext
from pagedllm.attention.cache_spec import KVCacheSpec
from pagedllm.attention.mla import kernels_serve, mla_decode, mla_prefill, write_latent
from pagedllm.distributed import get_tp_size
from pagedllm.layers.linear import Linear
from pagedllm.layers.moe import FusedMoE, load_moe_weights
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.parallel import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from pagedllm.models.utils import tie_or_skip
from pagedllm.quant.unquantized import UnquantizedLinearMethod

# the dense MLPs' (and shared experts') gate/up checkpoint tensors -> fused gate_up_proj
STACKED = [("gate_up_proj", "gate_proj", "gate"), ("gate_up_proj", "up_proj", "up")]
_LATENT_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: DeepSeek's default eps, not the config's
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mla_softmax_scale(config) -> float:
    """``qk_head_dim^-0.5``, times ``yarn_mscale(factor, mscale_all_dim)^2`` under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        mscale = yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale


def mla_rotary(config, max_position: int, interleaved: bool) -> RotaryEmbedding:
    """RoPE over the ``qk_rope_head_dim`` dims; interleaved pairs are GPT-J style (the
    same dot products as Hugging Face's complex / de-interleaving forms)."""
    dim = config.qk_rope_head_dim
    original = getattr(config, "original_max_position_embeddings", None) or \
        config.max_position_embeddings
    return RotaryEmbedding(dim, dim, max(max_position, original), rope_parameters(config),
                           original, is_neox_style=not interleaved)


class MLAAttention(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, *, interleaved: bool,
                 quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        heads, hidden = config.num_attention_heads, config.hidden_size
        bias = bool(getattr(config, "attention_bias", False))
        linear = {"quant_config": quant_config}
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * (self.nope + self.rope),
                                               prefix=f"{prefix}.q_proj", **linear)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias, prefix=f"{prefix}.q_a_proj",
                                   **linear)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank,
                                                 heads * (self.nope + self.rope),
                                                 prefix=f"{prefix}.q_b_proj", **linear)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope, bias,
                                         prefix=f"{prefix}.kv_a_proj_with_mqa", **linear)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank,
                                              heads * (self.nope + self.v_dim),
                                              prefix=f"{prefix}.kv_b_proj", **linear)
        if not isinstance(self.kv_b_proj.quant_method, UnquantizedLinearMethod):
            raise ValueError(f"{prefix}.kv_b_proj must be unquantized: the absorbed MLA decode "
                             "multiplies by its weight directly")
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias,
                                        prefix=f"{prefix}.o_proj", **linear)
        self.num_heads = heads // get_tp_size()  # this rank's
        self.rotary_emb = mla_rotary(config, max_position, interleaved)
        self.scale = mla_softmax_scale(config)

    def _queries(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        return q.view(hidden.shape[0], self.num_heads, self.nope + self.rope)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, r], W_UV [H, v, r]): this rank's heads of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.reshape(self.num_heads, self.nope + self.v_dim,
                                          self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latents [S, r + rope] -> (keys [S, H, nope + rope], values [S, H, v])."""
        c, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(-1, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)], dim=-1)
        return k, v

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        meta, cache = ctx.attn_metadata, ctx.kv_caches[self.layer_idx]
        q = self._queries(hidden)
        c, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q[..., self.nope:], k_pe.unsqueeze(1))
        q = torch.cat([q[..., :self.nope], q_pe], dim=-1)
        write_latent(cache, torch.cat([self.kv_a_layernorm(c), k_pe.squeeze(1)], dim=-1),
                     meta.slot_mapping)
        out = q.new_empty(q.shape[0], self.num_heads, self.v_dim)
        nd = meta.num_decodes
        if nd:
            w_uk, w_uv = self._up_weights()
            out[:nd] = mla_decode(q[:nd, :, :self.nope], q[:nd, :, self.nope:], cache, meta,
                                  w_uk, w_uv, self.scale)
        if meta.prefills:
            mla_prefill(q, cache, meta, self._expand, out, self.scale)
        return self.o_proj(out.view(q.shape[0], self.num_heads * self.v_dim))


class DeepseekMoE(nn.Module):
    """Router ``gate`` (+ V3's ``e_score_correction_bias``), routed ``experts`` and the
    always-on ``shared_experts``."""

    def __init__(self, config, v3: bool, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        num_experts, hidden = config.n_routed_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(hidden, num_experts)
        if v3:  # fp32, as Hugging Face keeps it; only picks experts
            self.gate.e_score_correction_bias = nn.Parameter(
                torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
        self.router_kwargs = _router_kwargs(config, v3)
        self.experts = FusedMoE(num_experts, hidden, config.moe_intermediate_size,
                                config.hidden_act, quant_config=quant_config,
                                prefix=f"{prefix}.experts")
        shared = (config.n_shared_experts or 0) * config.moe_intermediate_size
        self.shared_experts = LlamaMLP(hidden, shared, config.hidden_act,
                                       _mlp_bias(config)) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate.weight.float())
        bias = getattr(self.gate, "e_score_correction_bias", None)
        out = self.experts.route(x, logits, self.top_k, correction_bias=bias,
                                 **self.router_kwargs)
        return out if self.shared_experts is None else out + self.shared_experts(x)


def _mlp_bias(config) -> bool:
    return bool(getattr(config, "mlp_bias", False))  # V2's config has it (default off)


def _router_kwargs(config, v3: bool) -> dict:
    kwargs = {"renormalize": bool(getattr(config, "norm_topk_prob", False)),
              "routed_scaling_factor": float(getattr(config, "routed_scaling_factor", 1.0))}
    if v3:
        return {**kwargs, "scoring": "sigmoid", "num_expert_group": config.n_group,
                "topk_group": config.topk_group}
    method = getattr(config, "topk_method", "greedy") or "greedy"
    if method == "group_limited_greedy":
        return {**kwargs, "scoring": "softmax", "num_expert_group": config.n_group,
                "topk_group": config.topk_group}
    if method != "greedy":
        raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported; supported: "
                         "greedy, group_limited_greedy")
    return {**kwargs, "scoring": "softmax"}


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, max_position: int, *, v3: bool,
                 interleaved: bool, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.self_attn = MLAAttention(config, layer_idx, max_position, interleaved=interleaved,
                                      quant_config=quant_config, prefix=f"{prefix}.self_attn")
        if layer_idx >= (config.first_k_dense_replace or 0) and config.n_routed_experts:
            self.mlp = DeepseekMoE(config, v3, quant_config, f"{prefix}.mlp")
        else:
            self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                _mlp_bias(config))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    forward = LlamaDecoderLayer.forward  # the same pre-norm block around its own parts


class DeepseekModel(LlamaModel):
    def make_layer(self, config, layer_idx: int, max_position: int, **kwargs) -> nn.Module:
        return DeepseekDecoderLayer(config, layer_idx, max_position,
                                    quant_config=self.quant_config,
                                    prefix=f"{self.prefix}.layers.{layer_idx}", **kwargs)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """Llama's causal LM (tensor and pipeline parallel) with DeepSeek layers; of the
    quantization methods only ``experts_int8`` applies."""
    supports_expert_quantization = True
    v3 = False

    @property
    def supports_cuda_graphs(self) -> bool:
        """True where the Triton MLA kernels serve CUDA (asked on CUDA only): every op of a
        decode step is then capture-safe (no host syncs or data-dependent shapes; padding
        rows' slot -1 skipped by the latent write, their seq_len 0 read nothing)."""
        return kernels_serve(torch.device("cuda"))

    @classmethod
    def kv_cache_spec(cls, model_config, tp_size: int) -> KVCacheSpec:
        """One latent per token (``kv_lora_rank + qk_rope_head_dim``), on every rank."""
        hf = model_config.hf_config
        return KVCacheSpec(1, 1, hf.kv_lora_rank + hf.qk_rope_head_dim, "mla_latent")

    def interleaved(self, config) -> bool:
        return True

    def make_model(self, config, max_position: int) -> nn.Module:
        return DeepseekModel(config, max_position, self.tie_word_embeddings, self.quant_config,
                             v3=self.v3, interleaved=self.interleaved(config))

    def _skip_mtp(self, name: str) -> str | None:
        """V3 checkpoints carry multi-token-prediction layers past the last decoder layer."""
        match = _LAYER.match(name)
        if match and int(match.group(1)) >= self.config.num_hidden_layers:
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_moe_weights(self, weights, STACKED, tie_or_skip(self.tie_word_embeddings),
                                rename=self._skip_mtp)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    v3 = True

    def interleaved(self, config) -> bool:
        return bool(getattr(config, "rope_interleave", True))
