"""The Triton W4A16 / W8A16 kernels (``pagedllm/quant/triton_wna16.py``: GEMV and GEMM)
against the torch dequantize-then-matmul references (``packing.gptq_dequantize``,
``packing.awq_dequantize``, ``PackedLinearMethod.dequantize``; product in float64), on random
packed words of the GPTQ (groups, per column, act-order g_idx, v1 zero offset, 4 and 8 bit),
AWQ and compressed-tensors (sym / asym, group / channel, actorder) layouts. Without a GPU the
kernels run under Triton's interpreter on tiny shapes; on a GPU also Llama-3-8B shapes, and
the CUDA engine's greedy tokens on tiny GPTQ / AWQ checkpoints against the CPU engine's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU, TOL, _rel_err

wq = pytest.importorskip("pagedllm.quant.triton_wna16")

from pagedllm.quant.compressed_tensors import PackedLinearMethod  # noqa: E402
from pagedllm.quant.packing import awq_dequantize, gptq_dequantize  # noqa: E402

gpu = pytest.mark.skipif(not ON_GPU, reason="large shapes and the engine need a GPU")


@pytest.fixture(autouse=True, params=["default-split-k", "small-split-k"])
def split_k(request, monkeypatch):
    """Each case twice: with the split-K sizes of the real shapes, and with splits small
    enough that tiny shapes split K too (the partial sums are exercised)."""
    if request.param == "small-split-k":
        monkeypatch.setattr(wq, "SPLIT_MIN_K", 32)
        monkeypatch.setattr(wq, "SPLIT_K_PER_ROW", 1)
    return request.param


def _words(shape, g):
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(
        torch.int32).to(DEVICE)


def _scales(shape, dtype, g):
    return (torch.rand(*shape, generator=g) * 0.02 + 0.005).to(dtype).to(DEVICE)


def _check(x, weight, w_in_out, gemv=None):
    out = wq.wna16_matmul(x, weight, gemv=gemv)
    ref = (x.double() @ w_in_out.double()).to(x.dtype)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert _rel_err(out.cpu(), ref.cpu()) < max(TOL[x.dtype], 1e-4)


def gptq_case(m, k, n, group, desc_act, bits, dtype, zero_offset=1, gemv=None):
    g = torch.Generator().manual_seed(k + n + m + bits)
    pack = 32 // bits
    groups = 1 if group == -1 else k // group
    qweight, qzeros = _words((k // pack, n), g), _words((groups, n // pack), g)
    scales = _scales((groups, n), dtype, g)
    g_idx = torch.arange(k) // (k if group == -1 else group)
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    g_idx = g_idx.int().to(DEVICE)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    weight = wq.gptq_weight(qweight, qzeros, scales, g_idx, bits, group, desc_act, zero_offset)
    _check(x, weight, gptq_dequantize(qweight, qzeros, scales.double(), g_idx, bits,
                                      zero_offset), gemv)


def awq_case(m, k, n, group, dtype, gemv=None):
    g = torch.Generator().manual_seed(k + n + m + 1)
    qweight, qzeros = _words((k, n // 8), g), _words((k // group, n // 8), g)
    scales = _scales((k // group, n), dtype, g)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    _check(x, wq.awq_weight(qweight, qzeros, scales, group),
           awq_dequantize(qweight, qzeros, scales.double(), group), gemv)


def compressed_case(m, k, n, bits, group, symmetric, actorder, dtype, gemv=None):
    g = torch.Generator().manual_seed(k + n + m + bits + 7)
    pack = 32 // bits
    groups = 1 if group is None else k // group
    layer = SimpleNamespace(weight_packed=_words((n, k // pack), g),
                            weight_scale=_scales((n, groups), dtype, g))
    layer.weight_zero_point = None if symmetric else _words((n // pack, groups), g)
    g_idx = None
    if actorder:
        g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].int().to(DEVICE)
        layer.weight_g_idx = g_idx
    method = PackedLinearMethod(bits, group, symmetric, actorder)
    ref = method.dequantize(SimpleNamespace(**{**vars(layer), "weight_scale":
                                               layer.weight_scale.double()})).t()
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    weight = wq.compressed_weight(layer.weight_packed, layer.weight_scale,
                                  layer.weight_zero_point, g_idx, bits, group)
    _check(x, weight, ref, gemv)


# tiny shapes: interpreter on CPU, compiled on a GPU
@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (1, torch.bfloat16),
                                     (5, torch.float16), (40, torch.bfloat16)])
@pytest.mark.parametrize("k,n,group,desc_act,bits", [(256, 96, 32, False, 4),
                                                     (256, 128, 32, False, 4),
                                                     (128, 64, 32, True, 4),
                                                     (64, 64, -1, False, 8),
                                                     (96, 40, 48, False, 4)])
def test_gptq_layout(m, dtype, gemv, k, n, group, desc_act, bits):
    """(256, 128, 32): N and the split a whole number of tiles, so the GEMV takes its EVEN
    path (no per-element masks; the prefetch stops at the split's end); n 96 does not."""
    if (k, n, group) == (96, 40, 48):  # no power-of-two tile divides the group: gathered rows
        n = 48
    gptq_case(m, k, n, group, desc_act, bits, dtype, gemv=gemv)


@pytest.mark.parametrize("per_row,splits", [(1, 4), (64, 1)])
def test_gemm_split_per_row(split_k, monkeypatch, per_row, splits):
    """The GEMM's optional last config entry (least inputs a split takes per row, a tuning
    candidate): 40 rows over K = 256 split in four (per row 1) or not at all (64)."""
    monkeypatch.setattr(wq, "SPLIT_MIN_K", 32)
    monkeypatch.setattr(wq, "_sm_count", lambda device: 1)
    config = (64, 32, 64, 4, 3, 64, per_row)
    assert wq._splits(2, 256, 64, 64, 40, per_row)[0] == splits
    g = torch.Generator().manual_seed(3)
    qweight, qzeros = _words((256 // 8, 64), g), _words((8, 64 // 8), g)
    scales = _scales((8, 64), torch.bfloat16, g)
    x = torch.randn(40, 256, generator=g).to(torch.bfloat16).to(DEVICE)
    g_idx = (torch.arange(256) // 32).int().to(DEVICE)
    weight = wq.gptq_weight(qweight, qzeros, scales, g_idx, 4, 32, False, 1)
    assert wq._gemm(x, weight, config)[1] == (splits > 1)  # partial sums: K was split
    out = wq.wna16_matmul(x, weight, config=config)
    ref = x.double() @ gptq_dequantize(qweight, qzeros, scales.double(), g_idx, 4, 1).double()
    assert _rel_err(out.cpu(), ref.to(torch.bfloat16)) < TOL[torch.bfloat16]


def test_gptq_v2_zero_offset():
    gptq_case(3, 128, 64, 32, False, 4, torch.float32, zero_offset=0)


@pytest.mark.parametrize("layout", ["gptq-act-order", "awq", "ct-8bit"])
def test_large_batches_dequantize_then_matmul(layout, monkeypatch):
    """From ``DEQUANT_MIN_ROWS`` rows the weight is dequantized by one kernel, then cuBLAS."""
    monkeypatch.setattr(wq, "DEQUANT_MIN_ROWS", 4)
    if layout == "gptq-act-order":
        gptq_case(6, 128, 64, 32, True, 4, torch.float32)
    elif layout == "awq":
        awq_case(6, 128, 64, 32, torch.float32)
    else:
        compressed_case(6, 128, 64, 8, 32, False, False, torch.float32)


@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (6, torch.bfloat16)])
@pytest.mark.parametrize("k,n,group", [(256, 96, 32), (128, 64, 128)])
def test_awq_layout(m, dtype, gemv, k, n, group):
    awq_case(m, k, n, group, dtype, gemv=gemv)


@pytest.mark.parametrize("gemv", [True, False])
@pytest.mark.parametrize("bits,group,symmetric,actorder", [(4, 32, True, False),
                                                           (4, 32, False, False),
                                                           (8, None, True, False),
                                                           (4, 32, True, True),
                                                           (8, 64, False, False)])
def test_compressed_tensors_layout(bits, group, symmetric, actorder, gemv):
    compressed_case(1 if gemv else 4, 128, 64, bits, group, symmetric, actorder,
                    torch.float32, gemv=gemv)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 16, 33, 64, 130, 512])
@pytest.mark.parametrize("k,n,group,desc_act,bits", [
    (4096, 6144, 128, False, 4), (14336, 4096, 128, False, 4), (4096, 28672, 128, False, 4),
    (1024, 448, 128, True, 4), (4096, 4096, -1, False, 8), (4096, 4096, 128, True, 8)])
def test_gptq_llama_shapes(dtype, m, k, n, group, desc_act, bits):
    gptq_case(m, k, n, group, desc_act, bits, dtype)


@gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (4096, 28672)])
def test_awq_llama_shapes(m, k, n):
    awq_case(m, k, n, 128, torch.bfloat16)


@gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 128, True), (4, 128, False),
                                                  (8, None, True)])
def test_compressed_tensors_llama_shapes(m, bits, group, symmetric):
    compressed_case(m, 4096, 4096, bits, group, symmetric, False, torch.bfloat16)


@gpu
@pytest.mark.parametrize("method", ["gptq", "awq", "gptq-8bit"])
def test_cuda_engine_greedy_equals_cpu(method, tmp_path):
    """fp32 both sides (the kernels' dots run in IEEE fp32 then): same greedy tokens, the
    CUDA engine through the Triton kernels, the CPU engine through the torch reference."""
    from tests.quant.checkpoints import quantized_checkpoint
    from tests.quant.test_quantized_models import _engine_greedy
    if method.startswith("gptq"):
        bits = 8 if method == "gptq-8bit" else 4
        config = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": True,
                  "sym": False}
        options = dict(bits=bits, group_size=32, desc_act=True, sym=False)
        method = "gptq"
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                  "version": "gemm"}
        options = dict(group_size=32)
    path, _ = quantized_checkpoint("llama", method, tmp_path / method, config, options)
    assert _engine_greedy(path, device="cuda") == _engine_greedy(path, device="cpu")


def _methods():
    from pagedllm.quant.awq import AWQLinearMethod
    from pagedllm.quant.gptq import GPTQConfig, GPTQLinearMethod
    return {"gptq-4bit": GPTQLinearMethod(GPTQConfig(4, 32, False, True)),
            "gptq-8bit-desc-act": GPTQLinearMethod(GPTQConfig(8, 32, True, False)),
            "gptq-v2-per-column": GPTQLinearMethod(GPTQConfig(4, -1, False, True, 0)),
            "awq": AWQLinearMethod(32),
            "ct-4bit-asym": PackedLinearMethod(4, 32, False, False),
            "ct-8bit-channel": PackedLinearMethod(8, None, True, False),
            "ct-4bit-actorder": PackedLinearMethod(4, 32, True, True)}


def _fill(layer, g):
    """Random packed words, positive scales, a shuffled act-order g_idx."""
    for name, param in layer.named_parameters():
        if name in ("g_idx", "weight_g_idx"):
            groups = (layer.scales if name == "g_idx" else layer.weight_scale.t()).shape[0]
            rows = param.numel()
            param.data.copy_((torch.arange(rows) * groups // rows)[torch.randperm(rows,
                                                                                  generator=g)])
        elif param.dtype == torch.int32:
            param.data.copy_(_words(param.shape, g))
        elif param.is_floating_point():
            param.data.copy_(_scales(param.shape, param.dtype, g))


@pytest.mark.parametrize("name", list(_methods()))
def test_quant_methods_run_the_kernels(name, monkeypatch):
    """Each quant method's ``apply`` (bias + gated SiLU epilogue) through the kernels equals
    its torch reference; on CPU the interpreter stands in for CUDA. (``PAGEDLLM_W4_MMA=0``:
    the layers that the tensor-core kernel would take stay on these; test_w4mma.py covers
    that kernel's methods.)"""
    from torch import nn

    from pagedllm import switches
    from pagedllm.quant import kernels
    monkeypatch.setattr(switches, "switches", lambda: switches.Switches(w4_mma=False))
    method = _methods()[name]
    layer = nn.Module()
    layer.prefix = "model.layers.0.mlp.gate_up_proj"
    with torch.device(DEVICE):
        method.create_weights(layer, 128, [64, 64], torch.float32)
    g = torch.Generator().manual_seed(len(name))
    _fill(layer, g)
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)  # CPU: as if on CUDA
    before = method.dequantize(layer)
    method.process_after_loading(layer)  # AWQ repacks into the K-packed layout here
    if name == "awq":
        assert layer.awq_repacked and layer.qweight.shape == (16, 128)
    if name.startswith("ct"):  # same shape, transposed in memory
        assert layer.weight_packed.shape == (128, 128 // (32 // method.bits))
        assert layer.weight_packed.stride() == (1, 128)
    if not name.startswith("gptq"):  # (GPTQ without desc_act resets g_idx after loading)
        assert torch.equal(method.dequantize(layer), before)
    bias = torch.randn(128, generator=g).to(DEVICE)
    for rows in (1, 3):
        x = torch.randn(rows, 128, generator=g).to(DEVICE)
        monkeypatch.setattr(kernels, "_serves", lambda x: True)
        out = method.apply(layer, x, bias, gated_silu=True)
        assert getattr(layer, "_wna16", None) is not None  # the kernel path ran
        monkeypatch.setattr(kernels, "_serves", lambda x: False)
        ref = method.apply(layer, x, bias, gated_silu=True)
        assert out.shape == (rows, 64)
        assert _rel_err(out.cpu(), ref.cpu()) < 1e-4


def test_gemv_reduce_launch_without_the_fold(monkeypatch):
    """PAGEDLLM_DECODE_FOLD=0: the one-row GEMV leaves its split-K sums to the reduce launch
    (and a plain GEMV's epilogue to torch) with the same results."""
    from pagedllm.switches import Switches
    monkeypatch.setattr(wq, "switches", lambda: Switches(decode_fold=False))
    gptq_case(1, 256, 96, 32, False, 4, torch.bfloat16, gemv=True)
    test_quant_methods_run_the_kernels("gptq-4bit", monkeypatch)


@gpu
@pytest.mark.parametrize("case", ["w4a16-group32-sym", "w4a16-group16-asym-actorder-weight",
                                  "w8a16-channel-qwen2"])
def test_cuda_engine_greedy_equals_cpu_compressed_tensors(case, tmp_path):
    """pack-quantized checkpoints written by the compressed-tensors library: the CUDA engine
    (Triton kernels) and the CPU engine (torch reference) give the same greedy tokens."""
    pytest.importorskip("compressed_tensors")
    from tests.quant.test_compressed_tensors import CASES, ct_checkpoint
    from tests.quant.test_quantized_models import _engine_greedy
    arch, scheme, fmt, ignore = CASES[case]
    path = ct_checkpoint(arch, scheme, fmt, tmp_path / case, ignore)
    assert _engine_greedy(path, device="cuda") == _engine_greedy(path, device="cpu")


@pytest.mark.skipif(ON_GPU, reason="the CUDA variant is test_cuda_engine_greedy_equals_cpu")
@pytest.mark.parametrize("method", ["awq"])  # (GPTQ act-order: test_quant_methods_run_...)
def test_cpu_engine_through_the_kernels_equals_reference(method, tmp_path, monkeypatch,
                                                         split_k):
    """The whole CPU engine with its quantized layers sent through the Triton kernels (the
    interpreter standing in for CUDA: AWQ repacked at load, fused epilogues, split-K) gives
    the greedy tokens of the same engine on the torch reference."""
    from pagedllm.quant import kernels
    from tests.quant.checkpoints import quantized_checkpoint
    from tests.quant.test_quantized_models import _engine_greedy
    if split_k != "small-split-k":
        pytest.skip("one split setting is enough here (the engine run takes ~10 s)")
    if method == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                  "sym": False}
        options = {"bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                  "version": "gemm"}
        options = {"group_size": 32}
    path, _ = quantized_checkpoint("llama", method, tmp_path / method, config, options)
    # one prompt at a time: decode steps of one row take the GEMV, prefills the GEMM
    reference = _engine_greedy(path, one_at_a_time=True, device="cpu")
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "_serves", lambda x: x.dtype == torch.float32)
    assert _engine_greedy(path, one_at_a_time=True, device="cpu") == reference



def test_gemv_bf16_x_at_an_odd_offset():
    """A bf16 x that starts 2 bytes past a 4-byte boundary cannot be read as int32 pairs
    (``X_PAIRS``): the GEMV reads it value by value and still matches the reference."""
    g = torch.Generator().manual_seed(7)
    k, n, group = 128, 64, 32
    qweight, qzeros = _words((k // 8, n), g), _words((k // group, n // 8), g)
    scales = _scales((k // group, n), torch.bfloat16, g)
    g_idx = (torch.arange(k) // group).int().to(DEVICE)
    x = torch.randn(1, k + 1, generator=g).to(torch.bfloat16).to(DEVICE)[:, 1:]
    assert x.is_contiguous() and x.data_ptr() % 4 == 2
    weight = wq.gptq_weight(qweight, qzeros, scales, g_idx, 4, group, False, 1)
    _check(x, weight, gptq_dequantize(qweight, qzeros, scales.double(), g_idx, 4, 1),
           gemv=True)
