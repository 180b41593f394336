"""The fused-MoE Triton kernels (``pagedllm/layers/fused_moe_triton.py``) against the torch
expert loop (``layers/moe.py``'s ``moe_reference``, run in float64 on upcast inputs), on
random inputs and routings from ``select_experts`` (softmax, with and without
renormalisation, grouped top-k). Without a GPU the kernels run under Triton's interpreter on
tiny shapes (the CPU cases take a few seconds); on a GPU also the Qwen3-30B-A3B and Mixtral
expert shapes, CUDA-graph capture, and ``FusedMoE``'s CUDA path against its CPU path.
Outputs are poisoned first (NaN), so an unwritten row fails."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU, TOL, _rel_err

fm = pytest.importorskip("pagedllm.layers.fused_moe_triton")

from pagedllm.layers.activation import ActAndMul  # noqa: E402
from pagedllm.layers import moe  # noqa: E402
from pagedllm.layers.moe import moe_reference, select_experts  # noqa: E402


def _problem(tokens, experts, hidden, inter, top_k, dtype, seed, renormalize=True,
             groups=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=gen)
    kwargs = dict(num_expert_group=groups, topk_group=2) if groups else {}
    weights, ids = select_experts(logits, top_k, renormalize=renormalize, **kwargs)
    cast = [t.to(dtype).to(DEVICE) for t in (x, gate_up, down)]
    return (*cast, weights.to(DEVICE), ids.to(DEVICE))


def _reference(x, gate_up, down, weights, ids):
    act = ActAndMul("silu")
    return moe_reference(x.double().cpu(), gate_up.double().cpu(), down.double().cpu(),
                         weights.double().cpu(), ids.cpu(), act)


def _check(tokens, experts, hidden, inter, top_k, dtype, seed, **kw):
    x, gate_up, down, weights, ids = _problem(tokens, experts, hidden, inter, top_k, dtype,
                                              seed, **kw)
    out = fm.fused_moe(x, gate_up, down, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    assert _rel_err(out.cpu(), _reference(x, gate_up, down, weights, ids)) < TOL[dtype]


# tiny shapes: interpreter on CPU (seconds), compiled on a GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k,renorm", [(1, 4, 2, True), (5, 8, 2, False),
                                                         (33, 8, 3, True), (7, 6, 1, False),
                                                         (90, 8, 2, True)])
def test_fused_moe_small(tokens, experts, top_k, renorm, dtype, monkeypatch):
    if tokens == 90:  # prefill-sized: the torch align path
        monkeypatch.setattr(fm, "ALIGN_KERNEL_MAX_PAIRS", 64)
    _check(tokens, experts, 32, 48, top_k, dtype, tokens * 31 + experts, renormalize=renorm)


@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k,configs", [
    (1, 4, 2, None), (3, 8, 3, ((1, 16, 1), (2, 8, 1))), (6, 16, 8, ((4, 64, 2), (1, 32, 1)))])
def test_fused_moe_both_paths(tokens, experts, top_k, configs, gemv):
    """The per-token GEMVs (top-k not a power of two: padded slots; K not a multiple of the
    block; the top-k sum fused) and the sorted grouped GEMMs, each forced at the same small
    batches."""
    x, gate_up, down, weights, ids = _problem(tokens, experts, 40, 24, top_k, torch.float32,
                                              tokens + top_k)
    out = fm.fused_moe(x, gate_up, down, weights, ids, configs if gemv else None, gemv=gemv)
    assert _rel_err(out.cpu(), _reference(x, gate_up, down, weights, ids)) < TOL[torch.float32]


@pytest.mark.parametrize("codes", ["int8", "fp8"])
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("tokens,dtype", [(1, torch.float32), (5, torch.float32),
                                          (3, torch.bfloat16)])
def test_fused_moe_int8_codes(tokens, dtype, gemv, codes):
    """``experts_int8``'s (and fp8 experts') storage straight into the kernels: int8 / e4m3
    codes with a scale per row, each row's sums scaled (gate and up rows each their own),
    against the expert loop on the dequantized weights, on both paths."""
    from pagedllm.quant.experts_int8 import dequantize_rows, quantize_rows
    x, gate_up, down, weights, ids = _problem(tokens, 6, 40, 24, 2, dtype, tokens + 11)
    q1, s1 = quantize_rows(gate_up.float().cpu(), codes)
    q2, s2 = quantize_rows(down.float().cpu(), codes)
    q1, s1, q2, s2 = (t.to(DEVICE) for t in (q1, s1, q2, s2))
    out = fm.fused_moe(x, q1, q2, weights, ids, gemv=gemv, scales=(s1, s2))
    ref = _reference(x, dequantize_rows(q1, s1, torch.float64),
                     dequantize_rows(q2, s2, torch.float64), weights, ids)
    assert out.dtype == dtype and _rel_err(out.cpu(), ref) < TOL[dtype]
    with pytest.raises(ValueError, match="scales"):
        fm.fused_moe(x, q1, q2, weights, ids, scales=(s2, s1))


def test_experts_int8_layer_takes_the_kernels(monkeypatch):
    """A ``FusedMoE`` with ``--quantization experts_int8`` hands its codes and scales to the
    fused kernels (the interpreter standing in for CUDA) and matches its torch path."""
    from pagedllm.layers import moe as moe_layer
    from pagedllm.quant.experts_int8 import ExpertsInt8Config
    torch.manual_seed(0)
    layer = moe_layer.FusedMoE(6, 40, 24, quant_config=ExpertsInt8Config(), prefix="m.experts")
    layer.gate_up_proj.weight_loader(layer.gate_up_proj, torch.randn(6, 48, 40) / 7, "gu")
    layer.down_proj.weight_loader(layer.down_proj, torch.randn(6, 40, 24) / 5, "d")
    x = torch.randn(4, 40)
    weights, ids = select_experts(torch.randn(4, 6), 2, renormalize=True)
    reference = layer(x, weights, ids)
    calls = []
    real = fm.fused_moe
    monkeypatch.setattr(moe_layer, "_fused_kernel",
                        lambda x, act: lambda *a, **k: calls.append(k) or real(*a, **k))
    layer.to(DEVICE)
    out = layer(x.to(DEVICE), weights.to(DEVICE), ids.to(DEVICE)).cpu()
    assert calls and calls[0]["scales"] is not None
    assert _rel_err(out, reference) < 1e-5


def test_fused_moe_grouped_topk_routing():
    """DeepSeek-style grouped top-k routing (4 groups, best 2) feeds the same kernels."""
    _check(9, 16, 64, 32, 4, torch.float32, 5, groups=4)


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("tokens,top_k,experts,block", [(11, 3, 6, 4), (300, 2, 6, 16),
                                                         (150, 4, 64, 16), (3, 8, 256, 64)])
def test_align_block_size_pads_each_expert_to_whole_blocks(tokens, top_k, experts, block,
                                                           path, monkeypatch):
    """Several chunks of pairs (the running counts), empty experts, more experts than pairs;
    the one-program kernel (decode) and the torch ops (prefill-sized batches)."""
    if path == "torch":
        monkeypatch.setattr(fm, "ALIGN_KERNEL_MAX_PAIRS", 0)
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen).to(DEVICE)
    sorted_ids, block_expert, num_padded = fm.align_block_size(ids, experts, block)
    sorted_ids, block_expert, flat = sorted_ids.cpu(), block_expert.cpu(), ids.reshape(-1).cpu()
    total = int(num_padded)
    counts = torch.bincount(flat, minlength=experts)
    assert total == int(((counts + block - 1) // block * block).sum())
    assert (block_expert[total // block:] == -1).all()
    assert sorted(sorted_ids[sorted_ids < flat.numel()].tolist()) == list(range(flat.numel()))
    assert (sorted_ids[total:] == flat.numel()).all()
    for b in range(total // block):
        rows = sorted_ids[block * b:block * b + block]
        rows = rows[rows < flat.numel()]
        assert (flat[rows] == block_expert[b]).all()
        assert rows.tolist() == sorted(rows.tolist())  # stable: pairs keep their order


@pytest.mark.parametrize("tokens,experts,top_k,renorm,scale", [
    (1, 8, 2, True, 1.0), (7, 60, 4, False, 1.0), (5, 128, 8, True, 1.0),
    (3, 64, 6, False, 2.5), (4, 256, 8, True, 1.0)])
def test_topk_softmax_matches_select_experts(tokens, experts, top_k, renorm, scale):
    """The one-launch router against ``select_experts``' torch path: fp32 logits (no ties):
    the same experts in the same (descending) order, weights within fp32 rounding; bf16
    logits (ties: which of two equal experts is unspecified in torch.topk): the same
    weights."""
    gen = torch.Generator().manual_seed(experts + top_k)
    logits = torch.randn(tokens, experts, generator=gen)
    ref_w, ref_ids = select_experts(logits, top_k, renormalize=renorm,
                                    routed_scaling_factor=scale)
    weights, ids = fm.route_topk(logits.to(DEVICE), top_k, renorm, scale)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    logits = logits.to(torch.bfloat16)
    ref_w, _ = select_experts(logits, top_k, renormalize=renorm, routed_scaling_factor=scale)
    weights, ids = fm.route_topk(logits.to(DEVICE), top_k, renorm, scale)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    assert all(len(set(row)) == top_k for row in ids.tolist())


@pytest.mark.parametrize("tokens,experts,top_k,groups,topk_group,scoring,bias,renorm,scale", [
    (3, 64, 6, 1, None, "sigmoid", False, False, 1.0),       # sigmoid, no groups
    (4, 160, 6, 8, 3, "softmax", False, False, 16.0),        # DeepSeek-V2: best expert a group
    (2, 256, 8, 8, 4, "sigmoid", True, True, 2.5),           # DeepSeek-V3: bias, top-2 sums
    (5, 60, 4, 3, 2, "sigmoid", True, False, 1.0),           # 3 groups (padded to 4)
    (1, 48, 4, 4, 4, "softmax", True, True, 1.0)])           # every group kept
def test_route_topk_matches_select_experts(tokens, experts, top_k, groups, topk_group,
                                           scoring, bias, renorm, scale):
    """The one-launch router with sigmoid scores, the correction bias and grouped top-k
    against ``select_experts``' torch path (fp32 logits: no ties): the same experts in the
    same order, weights within fp32 rounding."""
    gen = torch.Generator().manual_seed(experts * 7 + top_k)
    logits = torch.randn(tokens, experts, generator=gen)
    corr = torch.rand(experts, generator=gen) * 0.5 if bias else None
    kwargs = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale,
                  num_expert_group=groups, topk_group=topk_group, correction_bias=corr)
    ref_w, ref_ids = select_experts(logits, top_k, **kwargs)
    weights, ids = fm.route_topk(logits.to(DEVICE), top_k, renorm, scale,
                                 sigmoid=scoring == "sigmoid",
                                 correction_bias=corr.to(DEVICE) if bias else None,
                                 num_expert_group=groups, topk_group=topk_group)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k,groups,topk_group,bias,match", [
    (7, 4, 1, False, "top_k 7"),            # one kept group of 6 experts cannot give 7
    (2, 4, 5, False, "topk_group 5"),       # more groups kept than there are
    (2, 24, 2, True, "two experts a group"),  # the top-2 group score of a 1-expert group
    (2, 5, 2, False, "do not divide")])
def test_routing_settings_rejected_alike(top_k, groups, topk_group, bias, match):
    """A router that cannot choose top_k distinct experts: the same ValueError from the
    kernel and from the torch path (the kernel repeated expert 0 before)."""
    logits = torch.randn(2, 24)
    corr = torch.rand(24) if bias else None
    kwargs = dict(num_expert_group=groups, topk_group=topk_group, correction_bias=corr)
    with pytest.raises(ValueError, match=match):
        select_experts(logits, top_k, scoring="sigmoid", **kwargs)
    with pytest.raises(ValueError, match=match):
        fm.route_topk(logits.to(DEVICE), top_k, False, sigmoid=True,
                      correction_bias=corr.to(DEVICE) if bias else None,
                      num_expert_group=groups, topk_group=topk_group)


@pytest.mark.parametrize("tokens,experts,top_k,groups,topk_group,scoring,bias,renorm,scale,codes", [
    (1, 16, 4, 1, None, "softmax", False, True, 1.0, None),   # Qwen3-MoE / Mixtral-like
    (1, 24, 3, 1, None, "softmax", False, False, 1.0, "int8"),  # top-k not a power of two
    (1, 32, 4, 4, 2, "sigmoid", True, True, 2.5, None),       # DeepSeek-V3-like
    (1, 40, 6, 8, 3, "softmax", False, False, 16.0, "fp8"),   # DeepSeek-V2-like, 8 groups
    (3, 16, 4, 1, None, "softmax", False, True, 1.0, None)])  # sorted path: route_topk first
def test_fused_moe_routed_matches_route_then_experts(tokens, experts, top_k, groups,
                                                     topk_group, scoring, bias, renorm, scale,
                                                     codes):
    """The gate/up GEMV routing each token itself from the router logits (one launch fewer)
    against ``select_experts`` then the expert loop: the same experts and weights (handed to
    the down launch), the same output."""
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    hidden, inter = 40, 24
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=gen)
    corr = torch.rand(experts, generator=gen) * 0.5 if bias else None
    kwargs = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale,
                  num_expert_group=groups, topk_group=topk_group, correction_bias=corr)
    ref_w, ref_ids = select_experts(logits, top_k, **kwargs)
    scales = None
    if codes is not None:  # per-row int8 / e4m3 codes, the reference on their dequantized rows
        dtype = torch.int8 if codes == "int8" else torch.float8_e4m3fn
        limit = 127.0 if codes == "int8" else 448.0
        qs = []
        for w in (gate_up, down):
            s = w.abs().amax(-1) / limit
            q = (w / s[..., None]).round() if codes == "int8" else w / s[..., None]
            qs.append((q.to(dtype), s))
        (gate_up, s_gu), (down, s_d) = qs
        scales = (s_gu.to(DEVICE), s_d.to(DEVICE))
        ref_gate_up, ref_down = gate_up.float() * s_gu[..., None], down.float() * s_d[..., None]
    else:
        ref_gate_up, ref_down = gate_up, down
    dev_kwargs = {**kwargs, "correction_bias": corr.to(DEVICE) if bias else None}
    router = moe.kernel_router(**dev_kwargs)
    out, weights, ids = fm.fused_moe_routed(x.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE),
                                            logits.to(DEVICE), top_k, router, scales=scales)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    ref = _reference(x, ref_gate_up, ref_down, ref_w, ref_ids)
    assert _rel_err(out.cpu(), ref) < TOL[torch.float32]


def test_fused_moe_routed_nan_logits_stay_in_range():
    """A NaN router logit (a broken checkpoint) must not give the down launch an expert id
    past the experts (the packed top-k keys order NaN above every number)."""
    gen = torch.Generator().manual_seed(3)
    x, gate_up, down = (torch.randn(*shape, generator=gen) for shape in
                        ((1, 16), (12, 16, 16), (12, 16, 8)))
    logits = torch.randn(1, 12, generator=gen)
    logits[0, 5] = float("nan")
    _, _, ids = fm.fused_moe_routed(x.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE),
                                    logits.to(DEVICE), 4, moe.kernel_router(renormalize=True))
    assert ids.min().item() >= 0 and ids.max().item() < 12
    assert len(set(ids[0].tolist())) == 4


def test_moe_block_routed_kernel_path_equals_torch_path(monkeypatch):
    """``MoEBlock`` with the routed kernels standing in for CUDA (the interpreter on CPU) at
    one token gives the torch path's output, and the router runs inside the kernel (no
    ``route_topk`` launch)."""
    torch.manual_seed(0)
    block = moe.MoEBlock(32, 8, 2, 16, renormalize=True)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(1, 32)
    ref = block(x)
    monkeypatch.setattr(moe, "_routed_kernel", lambda x, act: fm.fused_moe_routed)
    monkeypatch.setattr(fm, "route_topk", None)  # the one-token path must not call it
    out = block(x)
    assert _rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,experts,offset", [(64, 8, 0.0), (48, 6, 1.0)])
def test_norm_router_matches_rms_norm_then_router(hidden, experts, offset, dtype):
    """The residual add, RMSNorm and router projection in one launch against
    ``rms_norm_ref`` and the projection rounded to x's dtype (fp32: within rounding; bf16:
    within one bf16 step: the interpreter's fp32 -> bf16 cast truncates)."""
    from pagedllm.layers.triton_ops import rms_norm_ref
    gen = torch.Generator().manual_seed(hidden + experts)
    x, res = (torch.randn(1, hidden, generator=gen).to(dtype) for _ in range(2))
    norm_w = torch.rand(hidden, generator=gen) + 0.5
    router_w = (torch.randn(experts, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    ref_x, ref_sum = rms_norm_ref(x, norm_w, 1e-6, offset, res)
    ref_logits = torch.nn.functional.linear(ref_x.float(), router_w.float()).to(dtype)
    normed, total, logits = fm.norm_router(x.to(DEVICE), res.to(DEVICE), norm_w.to(DEVICE),
                                           1e-6, router_w.to(DEVICE), offset)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(total.cpu(), ref_sum, **tol)
    torch.testing.assert_close(normed.cpu(), ref_x, **tol)
    torch.testing.assert_close(logits.cpu().float(), ref_logits.float(), rtol=1e-2, atol=1e-2)
    assert logits.dtype == dtype


def test_moe_block_norm_forward_fused_equals_unfused(monkeypatch):
    """``MoEBlock.norm_forward`` through ``norm_router`` and the routed kernels (interpreter
    on CPU) against the norm, the router and the torch expert loop, one token."""
    from pagedllm.layers.norm import RMSNorm
    torch.manual_seed(1)
    block = moe.MoEBlock(32, 8, 2, 16, renormalize=True)
    norm = RMSNorm(32, 1e-6)
    for p in [*block.parameters(), *norm.parameters()]:
        p.data.normal_(0, 0.3)
    hidden, residual = torch.randn(1, 32), torch.randn(1, 32)
    ref_out, ref_res = block.norm_forward(hidden, residual, norm)
    calls = []
    monkeypatch.setattr(moe, "_routed_kernel", lambda x, act: fm.fused_moe_routed)
    monkeypatch.setattr(moe, "_fused_norm_router",
                        lambda x, act: lambda *a: calls.append(1) or fm.norm_router(*a))
    out, res = block.norm_forward(hidden, residual, norm)
    assert calls == [1]
    torch.testing.assert_close(res, ref_res)
    assert _rel_err(out, ref_out) < TOL[torch.float32]


def test_route_topk_nan_logits_stay_in_range():
    """NaN logits (a broken checkpoint) must not produce an expert id past the experts: the
    MoE kernels would index out of bounds."""
    logits = torch.randn(3, 60)
    logits[1, 7] = float("nan")
    _, ids = fm.route_topk(logits.to(DEVICE), 4, True)
    assert ids.min().item() >= 0 and ids.max().item() < 60


gpu = pytest.mark.skipif(not ON_GPU, reason="large shapes and CUDA graphs need a GPU")


@gpu
@pytest.mark.parametrize("tokens", [1, 16, 64, 256, 1000])
@pytest.mark.parametrize("shape", [(128, 2048, 768, 8), (8, 4096, 14336 // 8, 2)],
                         ids=["qwen3-30b-a3b", "mixtral-narrow"])
def test_fused_moe_model_shapes(tokens, shape):
    experts, hidden, inter, top_k = shape
    _check(tokens, experts, hidden, inter, top_k, torch.bfloat16, tokens + experts)


@gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_every_config_of_the_table(tokens):
    """Each row of ``MOE_CONFIGS`` computes the same function (the table only tunes)."""
    x, gate_up, down, weights, ids = _problem(tokens, 32, 256, 192, 4, torch.bfloat16, 3)
    ref = _reference(x, gate_up, down, weights, ids)
    for _, gate_up_cfg, down_cfg in fm.MOE_CONFIGS:
        out = fm.fused_moe(x, gate_up, down, weights, ids, configs=(gate_up_cfg, down_cfg),
                           gemv=False)
        assert _rel_err(out.cpu(), ref) < TOL[torch.bfloat16], (gate_up_cfg, down_cfg)


@gpu
def test_fused_moe_cuda_graph_replays_new_routings():
    """Captured once, replayed on new inputs and routings: the same result as eager."""
    x, gate_up, down, weights, ids = _problem(4, 16, 128, 64, 4, torch.bfloat16, 11)
    fm.fused_moe(x, gate_up, down, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_moe(x, gate_up, down, weights, ids)
    for seed in range(3):
        x2, _, _, w2, i2 = _problem(4, 16, 128, 64, 4, torch.bfloat16, 100 + seed)
        x.copy_(x2), weights.copy_(w2), ids.copy_(i2)
        out.fill_(float("nan"))
        graph.replay()
        assert _rel_err(out.cpu(), _reference(x, gate_up, down, weights, ids)) < 1e-2


@gpu
def test_fused_moe_layer_cuda_matches_cpu():
    """``MoEBlock`` on CUDA (fused kernels) against the same block on CPU (the torch loop)."""
    from pagedllm.layers.moe import MoEBlock
    torch.manual_seed(0)
    block = MoEBlock(256, 16, 4, 128, renormalize=True)
    for p in block.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(37, 256)
    ref = block(x)
    out = block.cuda()(x.cuda())
    assert _rel_err(out.cpu(), ref) < 1e-4  # fp32: tf32-free IEEE dots


@gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_models_cuda_engine_greedy_equals_cpu(arch):
    """Tiny MoE checkpoints (tests/models/test_moe_models.py), fp32: the CUDA engine (fused
    router and experts, CUDA graphs on) gives the CPU engine's (torch loop) greedy tokens."""
    from tests.models.test_moe_models import _generate, _prompts, build_tiny_moe
    path = str(build_tiny_moe(arch))
    prompts = _prompts()
    assert _generate(path, prompts, device="cuda") == _generate(path, prompts, device="cpu")


@pytest.mark.skipif(ON_GPU, reason="the CUDA variant is test_moe_models_cuda_engine_...")
@pytest.mark.parametrize("routed", [False, True])
def test_cpu_engine_through_the_fused_kernels_equals_reference(routed, monkeypatch):
    """A tiny Qwen3-MoE through the whole CPU engine with its experts sent through the fused
    kernels (the interpreter standing in for CUDA) gives the torch loop's greedy tokens;
    ``routed``: with ``PAGEDLLM_MOE_ROUTED=1`` (the norm in the router's launch, the routing
    in the experts' on one-token steps)."""
    import dataclasses

    from pagedllm import switches as sw
    from tests.models.test_moe_models import _generate, _prompts, build_tiny_moe
    path = str(build_tiny_moe("qwen3_moe"))
    prompts = _prompts()[:1 if routed else 2]  # one sequence: one-token decode steps
    reference = _generate(path, prompts, device="cpu")
    monkeypatch.setattr(moe, "_fused_kernel", lambda x, act: fm.fused_moe)
    monkeypatch.setattr(moe, "switches",
                        lambda: dataclasses.replace(sw.Switches(), moe_routed=routed))
    calls = []
    if routed:
        norm_router = fm.norm_router
        monkeypatch.setattr(fm, "norm_router", lambda *a: calls.append(1) or norm_router(*a))
    assert _generate(path, prompts, device="cpu") == reference
    assert bool(calls) == routed  # the fused decode path ran
