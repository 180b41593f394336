"""The MoE layer (``pagedllm/layers/moe.py``) against straightforward per-token references.

- ``FusedMoE`` (a loop over experts) equals, token by token, the weighted sum over its k
  experts of ``down @ act(gate @ x) * (up @ x)``, written out per token and per expert.
- ``select_experts`` equals a per-token reference: softmax / sigmoid scores, renormalised
  or not, and DeepSeek's grouped top-k (group = its best score, or the sum of its best two
  with a correction bias) by enumerating the groups of each token.
- The loader: per-expert checkpoint tensors (gate/up/down and Mixtral's w1/w3/w2 names)
  and the stacked ``[E, ...]`` tensors transformers 5 keeps give identical parameters; at
  tensor-parallel size 2 each rank's slice gives a partial output and the two partials sum
  to the single-rank output (what the all-reduce computes).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pagedllm import distributed
from pagedllm.layers.moe import (FusedMoE, MoEBlock, load_moe_weights, moe_reference,
                                 moe_static, per_expert_target, select_experts)

E, H, I, K, T = 6, 16, 12, 2, 9


def _expert_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"experts.{e}.{part}.weight": torch.randn(shape, generator=g)
            for e in range(E)
            for part, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)),
                                ("down_proj", (H, I)))}


def _stacked(per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers-5 layout: gate rows then up rows per expert; down stacked."""
    gate_up = torch.stack([torch.cat([per_expert[f"experts.{e}.gate_proj.weight"],
                                      per_expert[f"experts.{e}.up_proj.weight"]])
                           for e in range(E)])
    down = torch.stack([per_expert[f"experts.{e}.down_proj.weight"] for e in range(E)])
    return {"experts.gate_up_proj": gate_up, "experts.down_proj": down}


def _load(module, tensors: dict[str, torch.Tensor]) -> set[str]:
    return load_moe_weights(module, tensors.items())


class _Holder(torch.nn.Module):
    """A module whose ``experts`` is the layer under test (checkpoint names line up)."""

    def __init__(self, act: str = "silu") -> None:
        super().__init__()
        self.experts = FusedMoE(E, H, I, act)


def _per_token_reference(x, tensors, weights, ids, act) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate = tensors[f"experts.{e}.gate_proj.weight"] @ x[t]
            up = tensors[f"experts.{e}.up_proj.weight"] @ x[t]
            out[t] += weights[t, k] * (tensors[f"experts.{e}.down_proj.weight"] @ (act(gate) * up))
    return out


def _routing(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[0] = torch.tensor([E - 1, 0])  # an unsorted pair; expert 4 may get no token at all
    weights = torch.rand(T, K, generator=g)
    return x, weights, ids


@pytest.mark.parametrize("act,fn", [("silu", F.silu),
                                    ("gelu_pytorch_tanh", lambda v: F.gelu(v, approximate="tanh"))])
def test_fused_moe_equals_per_token_reference(act, fn):
    tensors = _expert_tensors()
    holder = _Holder(act)
    assert _load(holder, tensors) == {"experts.gate_up_proj", "experts.down_proj"}
    x, weights, ids = _routing()
    with torch.no_grad():
        out = holder.experts(x, weights, ids)
    torch.testing.assert_close(out, _per_token_reference(x, tensors, weights, ids, fn),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, T])  # T*k <= E: gathered experts; else all experts
def test_graph_capturable_path_equals_loop(tokens):
    """``moe_static`` (what a CUDA graph captures) gives the loop's result."""
    holder = _Holder()
    _load(holder, _expert_tensors())
    x, weights, ids = (t[:tokens] for t in _routing())
    args = (x, holder.experts.gate_up_proj, holder.experts.down_proj, weights, ids,
            holder.experts.act_fn)
    with torch.no_grad():
        torch.testing.assert_close(moe_static(*args), moe_reference(*args), atol=1e-4,
                                   rtol=1e-5)


def test_per_expert_and_stacked_layouts_load_identically():
    tensors = _expert_tensors()
    mixtral_names = {k.replace("gate_proj", "w1").replace("up_proj", "w3")
                     .replace("down_proj", "w2"): v for k, v in tensors.items()}
    holders = [_Holder() for _ in range(3)]
    for holder, layout in zip(holders, (tensors, mixtral_names, _stacked(tensors))):
        assert _load(holder, layout) == {"experts.gate_up_proj", "experts.down_proj"}
    for other in holders[1:]:
        assert torch.equal(other.experts.gate_up_proj, holders[0].experts.gate_up_proj)
        assert torch.equal(other.experts.down_proj, holders[0].experts.down_proj)
    assert per_expert_target("model.layers.3.mlp.experts.7.w2.weight") == (
        "model.layers.3.mlp.experts.down_proj", 7, "down")
    assert per_expert_target("model.layers.3.mlp.shared_expert.up_proj.weight") is None


def test_missing_expert_is_not_reported_loaded():
    tensors = {k: v for k, v in _expert_tensors().items() if not k.startswith("experts.3.up")}
    assert _load(_Holder(), tensors) == {"experts.down_proj"}
    with pytest.raises(ValueError, match=r"experts.0.gate_proj.weight.*shape \(12, 15\)"):
        _load(_Holder(), {"experts.0.gate_proj.weight": torch.zeros(I, H - 1)})


def test_tp2_rank_partials_sum_to_full_output(monkeypatch):
    """Each rank holds half of every expert's intermediate dim (gate and up rows, down
    columns); summing the ranks' unreduced outputs gives the tp=1 output."""
    tensors = _expert_tensors()
    x, weights, ids = _routing()
    full = _Holder()
    for layout in (tensors, _stacked(tensors)):
        _load(full, layout)
        partials = []
        for rank in range(2):
            monkeypatch.setattr(distributed.STATE, "tp_size", 2)
            monkeypatch.setattr(distributed.STATE, "tp_rank", rank)
            shard = _Holder()
            _load(shard, layout)
            assert shard.experts.gate_up_proj.shape == (E, I, H)  # I/2 gate + I/2 up rows
            assert shard.experts.down_proj.shape == (E, H, I // 2)
            monkeypatch.undo()
            with torch.no_grad():
                partials.append(shard.experts(x, weights, ids, reduce=False))
        with torch.no_grad():
            torch.testing.assert_close(partials[0] + partials[1], full.experts(x, weights, ids),
                                       atol=1e-4, rtol=1e-5)


def _reference_route(logits, top_k, scoring, renormalize, groups=None, topk_group=None,
                     bias=None, scale=1.0):
    """Per token: scores, the kept groups by explicit ranking, the k best allowed experts."""
    weights, ids = [], []
    for row in logits.tolist():
        if scoring == "softmax":
            total = sum(math.exp(v) for v in row)
            scores = [math.exp(v) / total for v in row]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = set(range(len(row)))
        if groups:
            size = len(row) // groups
            members = [choice[g * size:(g + 1) * size] for g in range(groups)]
            rank = [sum(sorted(m)[-2:]) if bias is not None else max(m) for m in members]
            kept = sorted(range(groups), key=lambda g: -rank[g])[:topk_group]
            allowed = {g * size + j for g in kept for j in range(size)}
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids)


@pytest.mark.parametrize("kwargs", [
    dict(scoring="softmax", renormalize=False),
    dict(scoring="softmax", renormalize=True),
    dict(scoring="sigmoid", renormalize=True),
    dict(scoring="softmax", renormalize=False, groups=4, topk_group=2, scale=2.5),  # V2
    dict(scoring="sigmoid", renormalize=True, groups=4, topk_group=2, bias=True),  # V3
])
def test_select_experts_matches_per_token_reference(kwargs):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(T, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.3 if kwargs.pop("bias", False) else None
    groups, topk_group = kwargs.pop("groups", None), kwargs.pop("topk_group", None)
    scale = kwargs.pop("scale", 1.0)
    weights, ids = select_experts(logits, 3, num_expert_group=groups, topk_group=topk_group,
                                  correction_bias=bias, routed_scaling_factor=scale, **kwargs)
    ref_w, ref_ids = _reference_route(logits, 3, kwargs["scoring"], kwargs["renormalize"],
                                      groups, topk_group, bias, scale)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=1e-5, rtol=1e-5)


def test_moe_block_with_gated_shared_expert_equals_reference():
    """Router (softmax, top-k, no renormalisation) + experts + sigmoid-gated shared expert,
    as Qwen2-MoE defines them, recomputed per token."""
    from pagedllm.models.llama import LlamaMLP
    g = torch.Generator().manual_seed(3)
    block = MoEBlock(H, E, K, I, shared_expert=LlamaMLP(H, 10, "silu"), shared_expert_gate=True)
    tensors = {"mlp." + k: v for k, v in _expert_tensors().items()}
    router, shared_gate = torch.randn(E, H, generator=g), torch.randn(1, H, generator=g)
    shared = {p: torch.randn(s, generator=g) for p, s in
              (("gate_proj", (10, H)), ("up_proj", (10, H)), ("down_proj", (H, 10)))}
    tensors.update({"mlp.gate.weight": router, "mlp.shared_expert_gate.weight": shared_gate})
    tensors.update({f"mlp.shared_expert.{p}.weight": v for p, v in shared.items()})
    holder = torch.nn.Module()
    holder.mlp = block
    from pagedllm.models.llama import STACKED
    assert load_moe_weights(holder, tensors.items(), STACKED) == set(
        dict(holder.named_parameters()))
    x = torch.randn(T, H, generator=g)
    weights, ids = (x @ router.T).softmax(-1).topk(K, dim=-1)
    expected = _per_token_reference(x, {k[4:]: v for k, v in tensors.items()}, weights, ids,
                                    F.silu)
    for t in range(T):
        h = F.silu(shared["gate_proj"] @ x[t]) * (shared["up_proj"] @ x[t])
        expected[t] += torch.sigmoid(shared_gate @ x[t]) * (shared["down_proj"] @ h)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-5)
