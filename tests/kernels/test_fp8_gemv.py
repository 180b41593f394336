"""The fp8 batch-1 GEMV (``pagedllm/quant/triton_fp8.fp8_gemv``) against the torch reference
of the W8A8 / W8A16 numerics: x rounded to e4m3 with the same scale (``fp8.activation_scale``
and ``fp8.quantize_fp8``, what ``fake_quantize_fp8`` does before it rounds x_q * scale back to
x's dtype: static, dynamic per tensor, per token) or not ("none"), the e4m3 weight, the
product in float64 scaled by x's scale and each row's scale (``_scaled_mm``'s epilogue), rounded
to x's dtype, then + bias (rounded) and silu(gate) * up as ``gptq.epilogue`` does. The only
difference allowed is fp32 summation order: the outputs must equal the rounded reference or
sit one unit in the last place of x's dtype from it.

Without a GPU the kernel runs under Triton's interpreter, its casts made to round to
nearest even and its fma fused (``exact_float_ops``); on a GPU also the Llama-3-8B shapes, and
``Fp8LinearMethod.apply`` at one row against the ``torch._scaled_mm`` path."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU  # interpreter set-up first
from tests.utils.triton_interpreter import exact_float_ops

from pagedllm.quant import fp8  # noqa: E402
from pagedllm.quant import triton_fp8 as tf  # noqa: E402
from pagedllm.quant.kernels import fp8_scaled_mm_supported  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def exact_interpreter():
    """On CPU: the interpreter's casts and fma as the GPU's, for this module only."""
    undo = None if ON_GPU else exact_float_ops()
    yield
    if undo is not None:
        undo()

HAS_FP8 = ON_GPU and fp8_scaled_mm_supported(torch.device("cuda"))
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="needs a CUDA GPU with fp8 support "
                               "(compute capability >= 8.9) for _scaled_mm and the compiled "
                               "kernel at Llama-3-8B shapes")
if ON_GPU and not HAS_FP8:
    pytest.skip("the fp8 GEMV needs compute capability >= 8.9 (Triton's e4m3 casts)",
                allow_module_level=True)


def _inputs(n_rows, k, activations, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=gen) * 2).to(dtype)
    weight = (torch.randn(n_rows, k, generator=gen) * 0.1).to(fp8.FP8)
    row_scale = torch.rand(n_rows, generator=gen) * 0.02 + 0.001
    x_scale = torch.rand(1, generator=gen) * 0.01 + 0.002 if activations == "static" else None
    b = torch.randn(n_rows, generator=gen).to(dtype) if bias else None
    return tuple(t if t is None else t.to(DEVICE) for t in (x, weight, row_scale, x_scale, b))


def reference(x, weight, row_scale, x_scale, activations, bias, gated):
    """The W8A8 (or W8A16) numerics in float64, rounded as ``scaled_mm_fp8`` +
    ``gptq.epilogue`` round: to x's dtype, + bias, then silu(gate) * up."""
    x, weight, row_scale = x.cpu(), weight.cpu(), row_scale.cpu()
    xq, scale = x.double(), torch.ones((), dtype=torch.float64)
    if activations != "none":  # fake_quantize_fp8 without its rounding of x_q * scale to bf16
        scale = fp8.activation_scale(x, x_scale.cpu()[0] if x_scale is not None else None,
                                     per_token=activations == "token")
        xq = fp8.quantize_fp8(x, scale).double()
    out = (xq @ weight.double().t() * scale.double() * row_scale.double()).to(x.dtype)
    if bias is not None:
        out = out + bias.cpu()
    if gated:
        d = out.shape[1] // 2
        gate, up = out[:, :d].float(), out[:, d:].float()
        out = (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)
    return out


def assert_rounded_equal(out, ref, dtype):
    """Equal, or one ulp of ``dtype`` apart (fp32 summation order decides a rounding)."""
    out, ref = out.cpu().double(), ref.double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    ulp = ref.abs().clamp_min(1e-30) * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
    far = (out - ref).abs() > ulp * 1.01 + 1e-6
    assert not far.any(), f"{int(far.sum())} of {far.numel()} outputs off by more than one ulp"
    exact = (out == ref).double().mean().item()
    assert exact > 0.9, f"only {exact:.3f} of the outputs equal the rounded reference"


CASES = [  # (n_rows, k, gated, bias, config)
    (48, 64, False, False, None),
    (37, 100, False, True, (4, 64, 2)),      # N odd, K not a multiple of the block
    (34, 200, True, False, (4, 64, 2)),      # gated, K tail over several chunks
    (22, 96, True, True, (8, 32, 1)),        # gated + bias, N not a multiple of BLOCK_N
    (5, 24, False, True, (2, 16, 1)),        # a tail chunk of 8
]


@pytest.mark.parametrize("activations", ["static", "dynamic", "token", "none"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_gemv_matches_reference(case, activations):
    n_rows, k, gated, bias, config = CASES[case]
    dtype = torch.bfloat16 if case % 2 == 0 else torch.float16
    x, weight, row_scale, x_scale, b = _inputs(n_rows, k, activations, bias, dtype,
                                               seed=case * 7 + len(activations))
    out = tf.fp8_gemv(x, weight, row_scale, x_scale, activations, bias=b, gated=gated,
                      config=config)
    assert out.dtype == dtype and out.shape == (1, n_rows // 2 if gated else n_rows)
    ref = reference(x, weight, row_scale, x_scale, activations, b, gated)
    assert_rounded_equal(out, ref, dtype)


# (x, the fp32 bits of a static scale) where x * (1 / scale) and x / scale, each rounded to
# fp32, fall either side of an e4m3 tie (100: 96 or 104): only a correctly rounded division
# gives torch's code (searched over bf16 x in [1, 4) and scales near x / tie)
NEAR_TIES = [(1.1328125, 1010407833), (1.140625, 1010491719), (1.2265625, 1011414466),
             (1.421875, 1013511618), (1.515625, 1014518251), (1.5234375, 1014602137)]


@pytest.mark.parametrize("x_value,scale_bits", NEAR_TIES)
def test_static_quantization_divides_exactly(x_value, scale_bits):
    """x / scale is rounded as IEEE division (torch's ``quantize_fp8``), not as x times the
    reciprocal: each case is one where the two give different e4m3 codes."""
    scale = torch.tensor([scale_bits], dtype=torch.int32).view(torch.float32)
    x = torch.full((1, 16), x_value, dtype=torch.bfloat16)
    naive = (x.float() * (1.0 / scale)).clamp(-448, 448).to(fp8.FP8).float()
    torch_code = fp8.quantize_fp8(x, scale).float()
    assert not torch.equal(naive, torch_code)  # the case discriminates
    weight = torch.eye(16).to(fp8.FP8)
    out = tf.fp8_gemv(x.to(DEVICE), weight.to(DEVICE), torch.ones(16, device=DEVICE),
                      scale.to(DEVICE), "static")
    assert torch.equal(out.cpu(), (torch_code * scale).to(torch.bfloat16))


def test_dynamic_scale_clamps_an_all_zero_row():
    """max|x| = 0: the scale is clamped at 1e-12 (as ``fp8.activation_scale``), no NaN."""
    x, weight, row_scale, _, _ = _inputs(16, 32, "dynamic", False, torch.bfloat16, 3)
    out = tf.fp8_gemv(torch.zeros_like(x), weight, row_scale, None, "dynamic")
    assert torch.equal(out.cpu(), torch.zeros(1, 16, dtype=torch.bfloat16))


def test_fp8_gemv_refuses_what_it_does_not_take():
    x, weight, row_scale, x_scale, _ = _inputs(16, 32, "static", False, torch.bfloat16, 4)
    with pytest.raises(ValueError, match="x_scale"):
        tf.fp8_gemv(x, weight, row_scale, x_scale, "dynamic")
    with pytest.raises(ValueError, match="one fp32 value"):
        tf.fp8_gemv(x, weight, row_scale, x_scale.to(torch.bfloat16), "static")
    with pytest.raises(ValueError, match="activations"):
        tf.fp8_gemv(x, weight, row_scale, None, "int8")
    with pytest.raises(ValueError, match=r"x \[1, K\]"):
        tf.fp8_gemv(x.repeat(2, 1), weight, row_scale, x_scale, "static")
    with pytest.raises(ValueError, match="gated"):
        tf.fp8_gemv(x, weight[:15], row_scale[:15], x_scale, "static", gated=True)


@needs_fp8
@pytest.mark.parametrize("shape", sorted(tf.FP8_GEMV_CONFIGS))
@pytest.mark.parametrize("activations", ["static", "dynamic", "none"])
def test_fp8_gemv_llama_shapes(shape, activations):
    """The tuned configs at their own shapes (gate_up gated, as the MLP calls it)."""
    n_rows, k = shape
    gated = n_rows == 28672
    x, weight, row_scale, x_scale, b = _inputs(n_rows, k, activations, False, torch.bfloat16,
                                               seed=n_rows + k)
    out = tf.fp8_gemv(x, weight, row_scale, x_scale, activations, gated=gated)
    assert_rounded_equal(out, reference(x, weight, row_scale, x_scale, activations, None,
                                        gated), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Fp8LinearMethod.apply at one row: the dispatch and the numbers

from pagedllm.switches import Switches  # noqa: E402
from tests.kernels.test_fp8_scaled_mm import CASES as LAYER_CASES, _layer  # noqa: E402

W8A16 = "weight-only"


def _method(case):
    if case == W8A16:
        return fp8.Fp8LinearMethod("none", per_channel=True), [96, 32]
    make, parts = LAYER_CASES[case]
    return make(), parts


def _spy(monkeypatch):
    calls = []
    real = tf.fp8_gemv

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gated"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tf, "fp8_gemv", spy)
    return calls


def _gemv_off(monkeypatch):
    monkeypatch.setattr(fp8, "switches", lambda: Switches(gemv="off"))


def _exact_apply_reference(method, layer, x, bias, gated):
    scale = layer.input_scale if method.static_input else None
    return reference(x, layer.weight, layer.row_scale, scale, method.activations, bias, gated)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", [*LAYER_CASES, W8A16])
def test_apply_at_one_row_runs_the_gemv(case, gated, monkeypatch):
    """One row: ``apply`` calls ``fp8_gemv`` (passing the static scale, bias and the gated
    epilogue), whose output is the exact W8A8 / W8A16 numbers; ``PAGEDLLM_GEMV=off`` keeps
    the other path. On CPU the layer is marked GEMV- and _scaled_mm-capable by hand (the
    kernel runs in the interpreter; the other path is then the torch reference); on an fp8
    GPU the other path is ``torch._scaled_mm`` (W8A8) or the reference (W8A16)."""
    gen = torch.Generator().manual_seed(len(case) + gated)
    method, parts = _method(case)
    layer = _layer(method, parts, 64, DEVICE, gen)
    if not ON_GPU:
        layer.fp8_gemv = True
        if method.activations != "none":
            layer.fp8_scaled_mm = True
            layer.fp8_uniform = bool(layer.row_scale.min() == layer.row_scale.max())
    x = (torch.randn(1, 64, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(sum(parts), generator=gen).to(torch.bfloat16).to(DEVICE)
    calls = _spy(monkeypatch)
    out = method.apply(layer, x, bias, gated_silu=gated)
    assert calls == [gated]
    assert_rounded_equal(out, _exact_apply_reference(method, layer, x, bias, gated),
                         torch.bfloat16)
    _gemv_off(monkeypatch)
    other = method.apply(layer, x, bias, gated_silu=gated)
    assert calls == [gated] and other.shape == out.shape
    err = ((out.double() - other.double()).norm() / other.double().norm()).item()
    # the reference path rounds x and W to bf16 (its ulp-level equality to _scaled_mm:
    # test_apply_gemv_equals_scaled_mm)
    assert err < 1e-2, err


@pytest.mark.parametrize("rows", [2, 5])
def test_apply_above_one_row_keeps_its_path(rows, monkeypatch):
    gen = torch.Generator().manual_seed(rows)
    method, parts = _method("per-tensor-dynamic")
    layer = _layer(method, parts, 64, DEVICE, gen)
    layer.fp8_gemv = True
    calls = _spy(monkeypatch)
    method.apply(layer, torch.randn(rows, 64, generator=gen).to(torch.bfloat16).to(DEVICE),
                 None)
    assert calls == []


def test_cpu_layers_are_not_marked_for_the_gemv():
    gen = torch.Generator().manual_seed(5)
    method, parts = _method("per-tensor-dynamic")
    assert not _layer(method, parts, 64, "cpu", gen).fp8_gemv


@needs_fp8
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_apply_gemv_equals_scaled_mm(case, monkeypatch):
    """On the device, Llama-sized K, bias and gated epilogue included: the GEMV's output at
    one row is the exact W8A8 result rounded (``assert_rounded_equal`` against the float64
    reference), and close to the ``torch._scaled_mm`` path's. Not within one ulp of that:
    cuBLASLt's fp8 GEMM accumulates with less precision than fp32, and on the H100 1 to 28
    of 2048 of its outputs were more than one bf16 ulp from the GEMV's (2026-12-07)."""
    gen = torch.Generator().manual_seed(11)
    method, parts = _method(case)
    layer = _layer(method, [p * 8 for p in parts], 4096, "cuda", gen)
    x = (torch.randn(1, 4096, generator=gen) * 2).to(torch.bfloat16).cuda()
    bias = torch.randn(sum(parts) * 8, generator=gen).to(torch.bfloat16).cuda()
    x_scale = layer.input_scale if method.static_input else None
    calls = _spy(monkeypatch)
    for gated in (False, True):
        out = method.apply(layer, x, bias, gated_silu=gated)
        monkeypatch.setattr(fp8, "switches", lambda: Switches(gemv="off"))
        other = method.apply(layer, x, bias, gated_silu=gated)
        monkeypatch.setattr(fp8, "switches", lambda: Switches())
        assert fp8._scaled_mm_mode(layer, x, method.activations) is not None
        ref = reference(x, layer.weight, layer.row_scale, x_scale, method.activations, bias,
                        gated)
        assert_rounded_equal(out, ref, torch.bfloat16)
        diff = (out.cpu().double() - other.cpu().double()).norm() / ref.double().norm()
        assert diff < 1e-2, f"GEMV vs _scaled_mm: relative difference {diff:.2e}"
    assert calls == [False, True]


@needs_fp8
def test_apply_gemv_inside_a_cuda_graph():
    """The dynamic scale is computed inside the kernel: a captured one-row step replays new
    inputs correctly (no host sync, fixed shapes)."""
    gen = torch.Generator().manual_seed(0)
    method, parts = _method("fused-parts-dynamic")
    layer = _layer(method, parts, 256, "cuda", gen)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16).cuda()
    method.apply(layer, x, None, gated_silu=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = method.apply(layer, x, None, gated_silu=True)
    x.copy_(torch.randn(1, 256, generator=gen).to(torch.bfloat16) * 3)
    graph.replay()
    assert_rounded_equal(out, _exact_apply_reference(method, layer, x, None, True),
                         torch.bfloat16)
