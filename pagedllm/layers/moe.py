"""Mixture-of-experts: the router, the stacked expert weights and their checkpoint loaders.

- ``select_experts``: router logits -> (top-k weights, expert ids) per token. Softmax or
  sigmoid scores, optional renormalisation of the chosen k, DeepSeek's grouped top-k (only
  the best ``topk_group`` of ``num_expert_group`` groups compete) with an optional score
  correction bias (which picks the experts but does not weight them), a routed scaling
  factor.
- ``FusedMoE``: every expert's gate/up projection in one ``[E, 2 * I, H]`` parameter
  (``gate_up_proj``, gate rows first) and down projection in one ``[E, H, I]`` (``down_proj``)
  — the names and layout transformers 5 keeps in memory, so its state dicts load whole. Its
  loader also takes hub checkpoints' per-expert tensors (``experts.<e>.gate_proj.weight``,
  Mixtral's ``w1``/``w3``/``w2``) given an ``expert_id`` and a shard id gate/up/down.
  How the stacked weights are stored is its ``quant_method`` (``pagedllm/quant``: dense, or
  int8 per output channel with ``--quantization experts_int8``): the loaders hand it this
  rank's full-precision rows, the forward asks it for indexable expert weights.
  Tensor parallelism splits every expert's intermediate dimension like a dense MLP
  (gate/up column-parallel, down row-parallel): each rank computes a partial sum of the
  weighted expert outputs and one all-reduce completes it.
- ``MoEBlock``: router ``gate`` + ``experts`` + an optional shared expert (Qwen2-MoE's, with
  its sigmoid ``shared_expert_gate``), module names as in Hugging Face.
- ``load_moe_weights``: ``models.utils.load_weights`` that first routes per-expert tensors.

On CUDA (Triton importable, ``PAGEDLLM_DISABLE_FUSED_OPS`` unset, SiLU experts) the experts
run as the fused grouped GEMMs of ``fused_moe_triton`` (tokens sorted by expert, gate/up with
SiLU*mul fused, down with the routing weights fused, the top-k sum; no host sync, so CUDA
graphs capture it); the quant method's ``kernel_weights`` hands them the stacked weights, or
int8 / e4m3 codes with their per-row scales (``experts_int8``, ``fp8`` experts: read as they
are, never dequantized). Elsewhere the forward is a torch loop over the experts that received
tokens (``moe_reference``: the CPU path and the oracle); while a CUDA graph is being captured
without the fused kernels it switches to ``moe_static`` (same result, static shapes, no host
sync).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import all_reduce, get_pp_size, get_tp_size, shard_range
from pagedllm.layers import fused as fused_ops
from pagedllm.layers.activation import ActAndMul
from pagedllm.layers.linear import Linear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.parallel import held_by_other_stage
from pagedllm.models.utils import StackedMapping, load_weights
from pagedllm.quant.base import get_moe_method
from pagedllm.switches import switches


def _group_mask(choice: torch.Tensor, num_groups: int, topk_group: int,
                by_top2_sum: bool) -> torch.Tensor:
    """[T, E] bool: the experts of each token's ``topk_group`` best groups. A group scores
    its best expert (DeepSeek-V2) or the sum of its best two (V3, with the correction bias)."""
    grouped = choice.view(choice.shape[0], num_groups, choice.shape[1] // num_groups)
    if by_top2_sum:
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)


def _check_scoring(scoring: str) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"MoE scoring function {scoring!r} is not supported "
                         "(supported: softmax, sigmoid)")


def check_routing(experts: int, top_k: int, groups: int, topk_group: int | None,
                  by_top2: bool) -> None:
    """ValueError naming the setting when a router cannot choose ``top_k`` distinct experts
    (the CUDA kernel and the torch path would fail differently, or repeat an expert)."""
    if groups > 1:
        if experts % groups:
            raise ValueError(f"MoE router: {experts} experts do not divide into "
                             f"num_expert_group {groups}")
        if topk_group is not None and not 0 < topk_group <= groups:
            raise ValueError(f"MoE router: topk_group {topk_group} must be 1..num_expert_group "
                             f"({groups})")
        if by_top2 and experts // groups < 2:
            raise ValueError("MoE router: a group scored by its best two experts (the "
                             f"correction bias) needs two experts a group, not {experts // groups}")
        experts = (topk_group or groups) * (experts // groups)
    if not 0 < top_k <= experts:
        raise ValueError(f"MoE router: top_k {top_k} must be 1..{experts} (the experts that "
                         "can be chosen)")


def select_experts(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                   renormalize: bool = False, num_expert_group: int | None = None,
                   topk_group: int | None = None, correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k] int64) from router logits [T, E].

    Scores are computed in fp32 as Hugging Face does; the correction bias only changes which
    experts are chosen, the weights are the unbiased scores of those experts. On CUDA all of
    it is one Triton launch (``fused_moe_triton.route_topk``)."""
    _check_scoring(scoring)
    groups = num_expert_group if num_expert_group and num_expert_group > 1 else 1
    if router_logits.is_cuda and router_logits.dim() == 2 and fused_ops.ops() is not None:
        from pagedllm.layers.fused_moe_triton import route_topk  # checks the settings too
        return route_topk(router_logits, top_k, renormalize, routed_scaling_factor,
                          sigmoid=scoring == "sigmoid", correction_bias=correction_bias,
                          num_expert_group=groups, topk_group=topk_group)
    check_routing(router_logits.shape[-1], top_k, groups, topk_group,
                  correction_bias is not None)
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if groups > 1:
        mask = _group_mask(choice, groups, topk_group or groups,
                           by_top2_sum=correction_bias is not None)
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids


def moe_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor,
                  act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token t, with experts
    ``down[e] @ act_and_mul(gate_up[e] @ x)``: a loop over the experts that received tokens,
    in ascending order (Hugging Face's order, so fp32 sums round alike)."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():  # sorted
        token_idx, k_idx = torch.where(ids == expert)
        h = act(F.linear(x[token_idx], gate_up[expert]))
        h = F.linear(h, down[expert]) * weights[token_idx, k_idx, None].to(h.dtype)
        out.index_add_(0, token_idx, h)
    return out


def moe_static(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               weights: torch.Tensor, ids: torch.Tensor,
               act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``moe_reference``'s result with no data-dependent shapes or host syncs, so a CUDA
    graph can capture it (the loop's ``unique()`` cannot be captured). Few (token, expert)
    pairs: gather each pair's expert weights and run batched mat-vecs (reads only the
    chosen experts); more pairs than experts: run every expert on every token, weighted by
    a dense [T, E] routing matrix (zero for unchosen experts)."""
    tokens, top_k = ids.shape
    num_experts = gate_up.shape[0]
    if tokens * top_k <= num_experts:
        flat = ids.reshape(-1)
        rows = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
        h = act(torch.bmm(gate_up[flat], rows).squeeze(-1))  # [T*k, I]
        y = torch.bmm(down[flat], h.unsqueeze(-1)).squeeze(-1).view(tokens, top_k, -1)
        return (y * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)
    dense = torch.zeros(tokens, num_experts, dtype=x.dtype, device=x.device)
    dense.scatter_(1, ids, weights.to(x.dtype))
    out = torch.zeros_like(x)
    for expert in range(num_experts):
        h = F.linear(act(F.linear(x, gate_up[expert])), down[expert])
        out += dense[:, expert:expert + 1] * h
    return out


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _fused_kernel(x: torch.Tensor, act: ActAndMul):
    """``fused_moe_triton.fused_moe`` when it serves this call (CUDA, Triton, SiLU), else
    None."""
    if not (x.is_cuda and act.is_silu and fused_ops.ops() is not None
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return None
    from pagedllm.layers.fused_moe_triton import fused_moe
    return fused_moe


def _routed_kernel(x: torch.Tensor, act: ActAndMul):
    """``fused_moe_triton.fused_moe_routed`` (the routing inside the experts' first launch)
    when the fused kernels serve this call, else None."""
    if _fused_kernel(x, act) is None or not switches().moe_routed:
        return None
    from pagedllm.layers.fused_moe_triton import fused_moe_routed
    return fused_moe_routed


def _fused_norm_router(x: torch.Tensor, act: ActAndMul):
    """``fused_moe_triton.norm_router`` where the routed kernels serve this call, else
    None."""
    if _routed_kernel(x, act) is None:
        return None
    from pagedllm.layers.fused_moe_triton import norm_router
    return norm_router


def kernel_router(scoring: str = "softmax", renormalize: bool = False,
                  num_expert_group: int | None = None, topk_group: int | None = None,
                  correction_bias: torch.Tensor | None = None,
                  routed_scaling_factor: float = 1.0):
    """``select_experts``' settings as the kernels' ``Router`` (``Router.check`` checks the
    groups and top-k against the experts)."""
    _check_scoring(scoring)
    from pagedllm.layers.fused_moe_triton import Router
    return Router(renormalize, routed_scaling_factor, scoring == "sigmoid", correction_bias,
                  num_expert_group or 1, topk_group)


_CODES = (torch.int8, torch.float8_e4m3fn)


def _kernel_reads(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  scales) -> bool:
    """Whether the fused kernels take these expert weights: x's dtype, or int8 / fp8 codes
    with per-row scales."""
    want = _CODES if scales is not None else (x.dtype,)
    return all(w.dtype in want and w.device == x.device for w in (gate_up, down))


class FusedMoE(nn.Module):
    """The routed experts of one layer, stacked; this rank's slice of every expert's
    intermediate dimension (all of it at tensor-parallel size 1). How the stacked weights
    are stored (dense, or int8 with ``--quantization experts_int8``) is the layer's
    ``quant_method`` (``pagedllm/quant``, chosen from ``quant_config`` and ``prefix``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: str = "silu", *, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        tp = get_tp_size()
        if intermediate_size % tp:
            raise ValueError(f"expert intermediate size ({intermediate_size}) does not divide "
                             f"by --tensor-parallel-size {tp}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.full_intermediate = intermediate_size
        self.intermediate = intermediate_size // tp
        self.quant_method = get_moe_method(quant_config, prefix)
        self.quant_method.create_weights(self, num_experts, hidden_size, self.intermediate,
                                         torch.get_default_dtype())
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.down_proj.weight_loader = self._load_down
        self.act_fn = ActAndMul(act)

    def _rank_slice(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        start, end = shard_range(self.full_intermediate)
        return loaded.narrow(dim, start, end - start)

    def _check(self, loaded: torch.Tensor, expected: tuple, name: str) -> None:
        if tuple(loaded.shape) != expected:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {expected}")

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "",
                      shard_id: str | None = None, expert_id: int | None = None) -> None:
        """Fused ``[E, 2I, H]`` (gate rows, then up rows), or one expert's gate or up
        ``[I, H]``; this rank keeps its slice of the I rows of each."""
        E, I, H = self.num_experts, self.full_intermediate, self.hidden_size
        if expert_id is None:
            self._check(loaded, (E, 2 * I, H), name)
            gate, up = loaded.split(I, dim=1)
            self.quant_method.store(self, "gate_up_proj", None, 0, torch.cat(
                [self._rank_slice(gate, 1), self._rank_slice(up, 1)], 1))
            return
        if shard_id not in ("gate", "up"):
            raise ValueError(f"checkpoint tensor {name!r}: shard {shard_id!r} is not gate/up")
        self._check(loaded, (I, H), name)
        offset = 0 if shard_id == "gate" else self.intermediate
        self.quant_method.store(self, "gate_up_proj", expert_id, offset,
                                self._rank_slice(loaded, 0))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "",
                   shard_id: str | None = None, expert_id: int | None = None) -> None:
        """Fused ``[E, H, I]`` or one expert's ``[H, I]``; this rank keeps its I columns."""
        E, I, H = self.num_experts, self.full_intermediate, self.hidden_size
        if expert_id is None:
            self._check(loaded, (E, H, I), name)
            self.quant_method.store(self, "down_proj", None, 0, self._rank_slice(loaded, 2))
            return
        self._check(loaded, (H, I), name)
        self.quant_method.store(self, "down_proj", expert_id, 0, self._rank_slice(loaded, 1))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                reduce: bool = True) -> torch.Tensor:
        """x [T, H]; weights, ids [T, k] -> [T, H]. ``reduce=False`` leaves this rank's
        partial sum (the caller all-reduces it with other partials)."""
        kernel = _fused_kernel(x, self.act_fn)
        packed = self.quant_method.kernel_weights(self) if kernel is not None else None
        if packed is not None and _kernel_reads(x, *packed):
            gate_up, down, scales = packed
            out = kernel(x, gate_up, down, weights, ids, scales=scales)
        else:
            gate_up, down = self.quant_method.expert_weights(self)  # int8 ones dequantize
            run = moe_static if _capturing() else moe_reference
            out = run(x, gate_up, down, weights, ids, self.act_fn)
        return all_reduce(out) if reduce and get_tp_size() > 1 else out

    def route(self, x: torch.Tensor, logits: torch.Tensor, top_k: int, reduce: bool = True,
              **router_kwargs) -> torch.Tensor:
        """``forward`` with the experts ``select_experts(logits, top_k, **router_kwargs)``
        picks. Through the fused kernels the routing runs inside the experts' first launch on
        decode steps (``fused_moe_routed``)."""
        kernel = _routed_kernel(x, self.act_fn) if logits.dim() == 2 else None
        packed = self.quant_method.kernel_weights(self) if kernel is not None else None
        if packed is None or not _kernel_reads(x, *packed):
            return self(x, *select_experts(logits, top_k, **router_kwargs), reduce=reduce)
        gate_up, down, scales = packed
        out, _, _ = kernel(x, gate_up, down, logits, top_k,
                           kernel_router(**router_kwargs), scales=scales)
        return all_reduce(out) if reduce and get_tp_size() > 1 else out


class MoEBlock(nn.Module):
    """Router + routed experts (+ an optional always-on shared expert, scaled per token by
    ``sigmoid(shared_expert_gate(x))`` when that gate exists). The router is replicated on
    every rank, so every rank picks the same experts."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 act: str = "silu", renormalize: bool = False,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False,
                 quant_config=None, prefix: str = "", **router_kwargs) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.router_kwargs = top_k, renormalize, router_kwargs
        self.gate = Linear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, act,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._experts(x, self.gate(x))

    def norm_forward(self, hidden: torch.Tensor, residual: torch.Tensor,
                     norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(norm(hidden + residual)), hidden + residual): the decoder layer's
        post-attention norm and this block. On one-token CUDA steps the norm and the router
        projection are one launch (``fused_moe_triton.norm_router``)."""
        fused = _fused_norm_router(hidden, self.experts.act_fn)
        weight = self.gate.weight
        if (fused is None or type(norm) is not RMSNorm or hidden.dim() != 2
                or hidden.shape[0] != 1 or self.gate.bias is not None
                or not isinstance(weight, torch.Tensor) or weight.dtype != hidden.dtype
                or weight.shape != (self.gate.output_size, hidden.shape[1])):
            x, residual = norm(hidden, residual)
            return self(x), residual
        x, residual, logits = fused(hidden, residual, norm.weight, norm.eps, weight,
                                    norm.offset)
        return self._experts(x, logits), residual

    def _experts(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = self.experts.route(x, logits, self.top_k, renormalize=self.renormalize,
                                 **self.router_kwargs)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


# checkpoint name part of one expert's projection -> shard id (Qwen/DeepSeek, Mixtral)
EXPERT_SHARDS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                 "w1": "gate", "w3": "up", "w2": "down"}
_PER_EXPERT = re.compile(r"^((?:.*\.)?experts)\.(\d+)\.(\w+)\.weight$")


def per_expert_target(name: str) -> tuple[str, int, str] | None:
    """(fused parameter name, expert id, shard id) of a per-expert checkpoint tensor, or
    None for any other tensor."""
    match = _PER_EXPERT.match(name)
    if match is None or match.group(3) not in EXPERT_SHARDS:
        return None
    shard = EXPERT_SHARDS[match.group(3)]
    fused = "down_proj" if shard == "down" else "gate_up_proj"
    return f"{match.group(1)}.{fused}", int(match.group(2)), shard


def load_moe_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                     stacked: StackedMapping = (), skip: tuple[str, ...] = (),
                     rename=None) -> set[str]:
    """``load_weights`` for models with ``FusedMoE`` layers: per-expert tensors go to their
    stacked parameter; a stacked parameter counts as loaded once every expert's parts are
    (so a missing expert is reported like any missing tensor); the rest load as usual."""
    params = dict(model.named_parameters())
    seen: dict[str, set[tuple[int, str]]] = {}

    def others():
        for name, tensor in weights:
            name = rename(name) if rename is not None else name
            target = per_expert_target(name) if name is not None else None
            if target is None:
                yield name, tensor
                continue
            fused, expert_id, shard = target
            if get_pp_size() > 1 and held_by_other_stage(model, fused):
                continue
            if fused not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in "
                                 f"{type(model).__name__}")
            params[fused].weight_loader(params[fused], tensor, name, shard, expert_id)
            seen.setdefault(fused, set()).add((expert_id, shard))

    loaded = load_weights(model, (item for item in others() if item[0] is not None),
                          stacked, skip)
    for fused, parts in seen.items():
        experts = params[fused].shape[0]
        if len(parts) == experts * (1 if fused.endswith("down_proj") else 2):
            loaded.add(fused)
    return loaded
