"""The tensor-core W4A16 kernel (``pagedllm/quant/triton_w4mma.py``) against the torch
dequantize-then-matmul reference (``packing.gptq_dequantize``, product in float64).

Without a GPU: the repacked layout reads back to the same codes; ``emulate`` (the fragment
arithmetic of one lane's ``mma.sync``, in torch) equals x @ W; the kernel runs under Triton's
interpreter with its inline PTX replaced by ``_mma_step_emulated`` (so its addressing,
tiles, splits and folds are checked); the dequantize kernel. On a GPU the kernel with the
PTX, Llama-3-8B shapes, and engines' greedy tokens (tests/kernels/test_wna16.py runs the GPTQ
and AWQ engines, which take this kernel on CUDA)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU, TOL, _rel_err

wm = pytest.importorskip("pagedllm.quant.triton_w4mma")

from pagedllm.quant.packing import gptq_dequantize, unpack_int32  # noqa: E402

gpu = pytest.mark.skipif(not ON_GPU, reason="large shapes need a GPU")


def _case(m, k, n, group, dtype, zeros=True, zero_offset=1, seed=0):
    g = torch.Generator().manual_seed(seed + k + n + m)
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), generator=g,
                            dtype=torch.int64).to(torch.int32)
    groups = 1 if group == -1 else k // group
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, n // 8), generator=g,
                           dtype=torch.int64).to(torch.int32) if zeros else None
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    g_idx = torch.arange(k) // (k if group == -1 else group)
    if zeros:
        ref_w = gptq_dequantize(qweight, qzeros, scales.double(), g_idx.int(), 4, zero_offset)
    else:  # the constant zero point
        codes = unpack_int32(qweight, 4, 0).double()
        ref_w = (codes - zero_offset) * scales.double()[g_idx]
    return x, qweight, qzeros, scales, ref_w


def test_repack_reads_back():
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (256 // 8, 48), generator=g,
                            dtype=torch.int64).to(torch.int32)
    words = wm.repack(qweight)
    assert words.shape == (3, 4, 32, 4) and words.dtype == torch.int32
    assert torch.equal(wm.unpack(words), unpack_int32(qweight, 4, 0))
    # a deliberately wrong order reads back wrong
    assert not torch.equal(wm.unpack(words.flip(-1)), unpack_int32(qweight, 4, 0))


@pytest.mark.parametrize("m", [1, 5, 8])
@pytest.mark.parametrize("group,zeros", [(64, True), (128, True), (-1, True), (128, False)])
def test_fragment_emulation(m, group, zeros):
    """The per-lane fragment bookkeeping of the PTX (A from the words, B from x in the
    layout's k order, D back per lane), emulated in torch, equals x @ W."""
    x, qweight, qzeros, scales, ref_w = _case(m, 256, 32, group, torch.bfloat16, zeros)
    words = wm.repack(qweight)
    out = wm.emulate(x, words, qzeros, scales, group, 1)
    ref = x.double() @ ref_w
    assert (out - ref).abs().max().item() < 1e-9 * ref.abs().max().item() + 1e-9
    dq = wm.dequantize_reference(words, qzeros, scales, group, 1)
    assert torch.allclose(dq.double(), ref_w, atol=1e-6)


def _check(m, k, n, group, dtype, zeros=True, tiles=None, gated=False, bias=False, seed=0):
    x, qweight, qzeros, scales, ref_w = _case(m, k, n, group, dtype, zeros, seed=seed)
    words = wm.repack(qweight)
    b = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype)
    dev = [t.to(DEVICE) if t is not None else None for t in (x, words, qzeros, scales, b)]
    out = wm.matmul(dev[0], dev[1], dev[2], dev[3], group, 1, bias=dev[4] if bias else None,
                    gated=gated, tiles=tiles)
    ref = x.double() @ ref_w
    if bias:
        ref = ref + b.double()
    if gated:
        ref = torch.nn.functional.silu(ref[:, :n // 2]) * ref[:, n // 2:]
    ref = ref.to(dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel_err(out.cpu(), ref) < max(TOL[dtype], 1e-4)


@pytest.fixture(params=["default-split-k", "small-split-k"])
def split_k(request, monkeypatch):
    """Each case with the real split sizes and with splits small enough that tiny shapes
    split K (the folds run)."""
    if request.param == "small-split-k":
        monkeypatch.setattr(wm, "SPLIT_MIN_K", 64)
        monkeypatch.setattr(wm, "SPLIT_K_PER_ROW", 1)
    return request.param


@pytest.mark.parametrize("m,tiles", [(1, None), (3, None), (8, None), (11, None), (5, 2),
                                     (20, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel(split_k, m, tiles, dtype):
    _check(m, 256, 64, 128, dtype, tiles=tiles)


@pytest.mark.parametrize("group,zeros", [(64, True), (-1, True), (128, False)])
def test_kernel_groups(split_k, group, zeros):
    _check(2, 256, 32, group, torch.bfloat16, zeros)


@pytest.mark.parametrize("m", [1, 9])
def test_kernel_gated_bias(split_k, m):
    _check(m, 128, 128, 64, torch.bfloat16, gated=True, bias=True)


def test_eligible_needs_whole_groups():
    """K must hold whole groups (DeepSeek-V2-Lite's down_proj: 10944 = 85.5 x 128; a ragged
    last group made the kernels read past K: NaNs), and groups whole 64-input tiles."""
    assert wm.eligible(4, False, 4096, 4096, 128)
    assert wm.eligible(4, False, 192, 64, -1) and wm.eligible(4, False, 192, 64, 256)
    assert not wm.eligible(4, False, 10944, 2048, 128)
    assert not wm.eligible(4, False, 192, 64, 128)
    assert not wm.eligible(4, False, 256, 64, 32)
    assert not wm.eligible(4, True, 256, 64, 128) and not wm.eligible(8, False, 256, 64, 128)


def test_kernel_rejects():
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        wm.matmul(x, torch.zeros(1, 1, 32, 4, dtype=torch.int32), None,
                  torch.ones(1, 16), -1, 8)


@pytest.mark.parametrize("group,zeros", [(128, True), (-1, False)])
def test_dequantize_kernel(group, zeros):
    x, qweight, qzeros, scales, ref_w = _case(1, 256, 48, group, torch.bfloat16, zeros)
    words = wm.repack(qweight).to(DEVICE)
    wt = wm.dequantize(words, qzeros.to(DEVICE) if zeros else None, scales.to(DEVICE),
                       group, 1, torch.float32)
    assert torch.allclose(wt.t().cpu().double(), ref_w, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("m", [1, 4, 16, 33, 64])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)])
def test_llama_shapes(m, k, n):
    _check(m, k, n, 128, torch.bfloat16, gated=(n == 28672))


def _layout_on(monkeypatch):
    """``PAGEDLLM_W4_MMA=1`` for this test (layers read it when they load)."""
    from pagedllm import switches
    monkeypatch.setattr(switches, "switches", lambda: switches.Switches(w4_mma=True))


@pytest.mark.skipif(ON_GPU, reason="on a GPU the methods take the kernel by themselves")
@pytest.mark.parametrize("method_name", ["gptq", "gptq-per-column", "awq", "ct-sym",
                                         "ct-asym-channel"])
def test_methods_repack_and_apply(monkeypatch, method_name):
    """GPTQ, AWQ and compressed-tensors pack-quantized 4-bit layers, as loading leaves them
    on CUDA (the interpreter standing in): ``process_after_loading`` repacks the weight into
    the layout, ``apply`` runs the kernel up to ``MAX_ROWS`` rows and the dequantize kernel
    above, ``dequantize`` reads the layout back; all equal the checkpoint layout's torch
    reference."""
    from types import SimpleNamespace

    from pagedllm.quant import kernels
    from pagedllm.quant import triton_wna16 as wq
    from pagedllm.quant.awq import AWQLinearMethod
    from pagedllm.quant.gptq import GPTQConfig, GPTQLinearMethod
    from pagedllm.quant.packing import awq_dequantize
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "wna16_for", lambda t: wq)
    _layout_on(monkeypatch)
    k, n = 256, 64
    layer = SimpleNamespace(prefix="model.layers.0.mlp.down_proj")
    g = torch.Generator().manual_seed(3)

    def fill(t):
        return torch.randint(-2**31, 2**31 - 1, t.shape, generator=g,
                             dtype=torch.int64).to(torch.int32)
    if method_name.startswith("ct"):
        from pagedllm.quant.compressed_tensors import PackedLinearMethod
        sym = method_name == "ct-sym"
        method = PackedLinearMethod(4, 128 if sym else None, sym, False)
        method.create_weights(layer, k, [n], torch.bfloat16)
        layer.weight_packed.data = fill(layer.weight_packed)
        if not sym:
            layer.weight_zero_point.data = fill(layer.weight_zero_point)
        layer.weight_scale.data = (torch.rand(layer.weight_scale.shape, generator=g) * 0.02
                                   + 0.005).to(torch.bfloat16)
        ref_w = method.dequantize(layer).double().t()
        layer.qweight = layer.weight_packed  # the layout's words, checked below
    elif method_name == "awq":
        method = AWQLinearMethod(64)
        method.create_weights(layer, k, [n], torch.bfloat16)
        layer.qweight.data, layer.qzeros.data = fill(layer.qweight), fill(layer.qzeros)
        layer.scales.data = (torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.005).to(
            torch.bfloat16)
        ref_w = awq_dequantize(layer.qweight, layer.qzeros, layer.scales.double(), 64)
    else:
        group = -1 if method_name == "gptq-per-column" else 128
        method = GPTQLinearMethod(GPTQConfig(4, group, False, True))
        method.create_weights(layer, k, [n], torch.bfloat16)
        layer.qweight.data, layer.qzeros.data = fill(layer.qweight), fill(layer.qzeros)
        layer.scales.data = (torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.005).to(
            torch.bfloat16)
        ref_w = gptq_dequantize(layer.qweight, layer.qzeros, layer.scales.double(),
                                layer.g_idx, 4, 1)
    method.process_after_loading(layer)
    if method_name.startswith("ct"):
        layer.qweight = layer.weight_packed
    assert layer.w4mma and layer.qweight.shape == (n // 16, k // 64, 32, 4)
    w = method.dequantize(layer).double()
    w = w.t() if method_name.startswith("ct") else w  # compressed-tensors: [out, in]
    assert torch.allclose(w, ref_w, rtol=1e-2, atol=1e-4)
    for rows in (1, 9, wm.MAX_ROWS + 6):
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        out = method.apply(layer, x, None)
        assert _rel_err(out, (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]
    x = torch.randn(3, k, generator=g)  # fp32: the layout's torch reference
    assert _rel_err(method.apply(layer, x, None), x.double() @ ref_w) < TOL[torch.bfloat16]


def _logprobs(path, **flags):
    """Each prompt's teacher-forced prompt logprobs and 8 greedy tokens with their
    logprobs."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    from tests.quant.test_quantized_models import _prompts
    llm = LLM(model=str(path), block_size=8, **flags)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    result = []
    for o in outs:
        prompt = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
        gen = o.outputs[0]
        result.append((prompt, list(gen.token_ids),
                       [{t: v.logprob for t, v in d.items()} for d in gen.logprobs]))
    if flags.get("device") == "cuda":  # every quantized projection took the layout
        model = llm.llm_engine.worker.runner.model
        quantized = [m for m in model.modules() if hasattr(m, "qweight")]
        assert quantized and all(getattr(m, "w4mma", False) for m in quantized)
    del llm
    return result


@gpu
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cuda_engine_matches_cpu(method, tmp_path, monkeypatch):
    """A tiny Llama (group 64, every projection in the layout) in bf16 on CUDA through the
    kernel (prefill up to 64 rows and one-row decode steps) against the CPU engine's fp32
    torch reference: prompt logprobs within bf16's error, and the greedy tokens equal up to
    the first step whose two best tokens the CPU run separates by less than that error."""
    from pagedllm.quant import triton_w4mma  # noqa: F401  (the CUDA layers take it)
    from tests.quant.checkpoints import quantized_checkpoint
    if method == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False,
                  "sym": True}
        options = dict(bits=4, group_size=64, desc_act=False, sym=True)
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                  "version": "gemm"}
        options = dict(group_size=64)
    path, _ = quantized_checkpoint("llama", method, tmp_path / method, config, options)
    _layout_on(monkeypatch)
    cpu = _logprobs(path, device="cpu", dtype="float32")
    cuda = _logprobs(path, device="cuda", dtype="bfloat16")
    for (p_cpu, t_cpu, l_cpu), (p_cuda, t_cuda, l_cuda) in zip(cpu, cuda):
        assert max(abs(a - b) for a, b in zip(p_cpu, p_cuda)) < 0.1
        for step, (a, b) in enumerate(zip(t_cpu, t_cuda)):
            if a != b:  # only where the CPU run's two best were within bf16's error
                assert b in l_cpu[step] and l_cpu[step][a] - l_cpu[step][b] < 0.1, step
                break
            assert abs(l_cpu[step][a] - l_cuda[step][b]) < 0.1


def test_kernel_takes_misaligned_rows():
    """x starting 2 bytes into its storage (a column slice) is copied before the int32-pair
    reads: same result as the aligned copy."""
    x, qweight, qzeros, scales, ref_w = _case(2, 128, 32, 64, torch.bfloat16)
    wide = torch.cat([torch.zeros(2, 1, dtype=torch.bfloat16), x], dim=1).to(DEVICE)
    sliced = wide[:, 1:]
    assert sliced.data_ptr() % 4 == 2
    out = wm.matmul(sliced, wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                    scales.to(DEVICE), 64, 1)
    assert _rel_err(out.cpu(), (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [9, 16, 33, 70])
@pytest.mark.parametrize("group,zeros", [(128, True), (-1, False)])
def test_gemm_reads_the_layout(split_k, m, group, zeros):
    """More than ``MMA_MAX_ROWS`` rows: ``_gemm_kernel`` decodes the layout's words into
    W^T tiles (the same weight), through ``w4_matmul`` with bias and the gated epilogue."""
    x, qweight, qzeros, scales, ref_w = _case(m, 256, 64, group, torch.bfloat16, zeros)
    b = torch.randn(64, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight).to(DEVICE),
                       qzeros.to(DEVICE) if zeros else None, scales.to(DEVICE), group, 1,
                       bias=b.to(DEVICE), gated=True)
    ref = x.double() @ ref_w + b.double()
    ref = (torch.nn.functional.silu(ref[:, :32]) * ref[:, 32:]).to(torch.bfloat16)
    assert _rel_err(out.cpu(), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("config,splits", [((16, 32, 64, 4, 3, 64, 8), 4),
                                           ((64, 64, 128, 4, 3, 2, 64), 1),
                                           ((16, 128, 64, 4, 3, 0, 8), 1)])
def test_gemm_config_override(monkeypatch, config, splits):
    """The GEMM route at a tuning candidate's config (``w4_matmul(config=...)``): tiles wider
    than N, K split in four or not at all, the same product."""
    from pagedllm.quant import triton_wna16
    monkeypatch.setattr(wm, "_sm_count", lambda device: 1)
    monkeypatch.setattr(triton_wna16, "SPLIT_MIN_K", 64)
    tiles = -(-64 // config[1]) * -(-12 // config[0])  # column tiles x row tiles
    assert wm._splits(12, 512, 64, tiles, config[5], 64, config[6]) == splits
    x, qweight, qzeros, scales, ref_w = _case(12, 512, 64, 64, torch.bfloat16, True)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                       scales.to(DEVICE), 64, 1, config=config)
    assert _rel_err(out.cpu(), (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]
    assert wm._gemm(x.to(DEVICE), wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                    scales.to(DEVICE), 64, 1, config)[1] == (splits > 1)  # K split or not


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's reads past N
@pytest.mark.parametrize("m", [20, 70])
def test_gemm_narrow_n(m):
    """N = 80 (a multiple of 16, of no wider tile): the GEMM's column tiles shrink to divide
    N, so no load reads words, scales or zeros past it."""
    x, qweight, qzeros, scales, ref_w = _case(m, 256, 80, 128, torch.bfloat16, True)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                       scales.to(DEVICE), 128, 1)
    assert _rel_err(out.cpu(), (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]


@gpu
@pytest.mark.parametrize("m", [1, 8, 16, 64, 130, 600])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])
def test_llama_shapes_by_rows(m, k, n):
    """``w4_matmul``'s route at each row count (register-fragment kernel, GEMM, dequantize +
    cuBLAS) on Llama-3-8B projections."""
    x, qweight, qzeros, scales, ref_w = _case(m, k, n, 128, torch.bfloat16)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight.to(DEVICE)), qzeros.to(DEVICE),
                       scales.to(DEVICE), 128, 1)
    assert _rel_err(out.cpu(), (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 12])
def test_gated_halves_off_the_block_grid(m):
    """gate / up halves of 24 features (N = 48): the fused epilogue cannot fold per 16-feature
    block, so the product comes whole and the gated SiLU after it."""
    x, qweight, qzeros, scales, ref_w = _case(m, 128, 48, 64, torch.bfloat16)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                       scales.to(DEVICE), 64, 1, gated=True)
    ref = x.double() @ ref_w
    ref = (torch.nn.functional.silu(ref[:, :24]) * ref[:, 24:]).to(torch.bfloat16)
    assert out.shape == (m, 24)
    assert _rel_err(out.cpu(), ref) < TOL[torch.bfloat16]


def test_gemm_splits_cover_k_exactly(monkeypatch):
    """The GEMM route's split-K: 10 groups over 3 splits wanted. Its kernel loops a split
    without a K mask, so every split must cover the same whole groups (4 + 4 + 2 would read
    two groups past K)."""
    from pagedllm.quant import triton_wna16 as wq
    for module in (wm, wq):
        monkeypatch.setattr(module, "SPLIT_MIN_K", 64)
        monkeypatch.setattr(module, "SPLIT_K_PER_ROW", 1)
    x, qweight, qzeros, scales, ref_w = _case(9, 640, 384, 64, torch.bfloat16)
    out = wm.w4_matmul(x.to(DEVICE), wm.repack(qweight).to(DEVICE), qzeros.to(DEVICE),
                       scales.to(DEVICE), 64, 1)
    assert _rel_err(out.cpu(), (x.double() @ ref_w).to(torch.bfloat16)) < TOL[torch.bfloat16]
