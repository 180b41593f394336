"""fp8 W8A8 through ``torch._scaled_mm`` (``Fp8LinearMethod.apply`` on CUDA with fp8 tensor
cores) against the same method's torch reference (activations rounded through fp8 with the
same scale, dequantized weight, product in float64 here): per-tensor and per-channel weight
scales, fused parts with different scales, static / dynamic / per-token activation scales,
``--quantization fp8`` at load; bf16 and fp16. The dispatch (which path runs) is checked on
CPU too."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedllm.quant import fp8
from pagedllm.quant.kernels import fp8_scaled_mm_supported

HAS_FP8 = torch.cuda.is_available() and fp8_scaled_mm_supported(torch.device("cuda"))
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="needs a CUDA GPU with fp8 tensor cores "
                               "(compute capability >= 8.9)")


def _layer(method, parts, k, device, gen, dtype=torch.bfloat16):
    layer = nn.Module()
    layer.prefix = "model.layers.0.self_attn.qkv_proj"
    with torch.device(device):
        method.create_weights(layer, k, parts, dtype)
    w = torch.randn(sum(parts), k, generator=gen) * 0.05
    if isinstance(method, fp8.Fp8OnLoadLinearMethod):
        layer.weight.data.copy_(w.to(dtype))
    else:
        layer.weight.data.copy_(w.to(fp8.FP8))
        shape = layer.weight_scale.shape
        layer.weight_scale.data.copy_(torch.rand(*shape, generator=gen) * 0.02 + 0.001)
        if method.static_input:
            layer.input_scale.data.copy_(torch.rand(len(parts), generator=gen) * 0.05 + 0.01)
    method.process_after_loading(layer)
    return layer


def _reference(method, layer, x, bias):
    """The reference path of the same method, in float64."""
    if method.activations != "none":
        scale = layer.input_scale[0] if method.static_input else None
        x = fp8.fake_quantize_fp8(x, scale, per_token=method.activations == "token")
    weight = layer.weight.double() * layer.row_scale.double().unsqueeze(1)
    return x.double() @ weight.t() + bias.double()


CASES = {
    "per-tensor-dynamic": (lambda: fp8.Fp8LinearMethod("dynamic"), [256]),
    "fused-parts-static": (lambda: fp8.Fp8LinearMethod("static"), [256, 64, 64]),
    "per-channel-per-token": (lambda: fp8.Fp8LinearMethod("token", per_channel=True), [320]),
    "fused-parts-dynamic": (lambda: fp8.Fp8LinearMethod("dynamic"), [128, 128]),
    "quantized-at-load": (lambda: fp8.Fp8OnLoadLinearMethod(), [192, 64]),
}


@needs_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_scaled_mm_matches_reference(case, rows, dtype):
    make, parts = CASES[case]
    gen = torch.Generator().manual_seed(rows)
    method = make()
    layer = _layer(method, parts, 512, "cuda", gen, dtype)
    assert layer.fp8_scaled_mm
    x = (torch.randn(rows, 512, generator=gen) * 2).to(dtype).cuda()
    bias = torch.randn(sum(parts), generator=gen).to(dtype).cuda()
    mode = fp8._scaled_mm_mode(layer, x, method.activations)
    if dtype == torch.float16 and not (layer.fp8_uniform and method.activations != "token"):
        assert mode is None  # row-wise scaling is bf16-only: the reference runs
    else:
        assert mode == ("tensor" if layer.fp8_uniform and method.activations != "token"
                        else "row")
    out = method.apply(layer, x, bias)
    ref = _reference(method, layer, x, bias)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == dtype and err < 1e-2, err


@needs_fp8
def test_scaled_mm_inside_a_cuda_graph():
    """Dynamic scales are computed on the device: the graph replays new inputs correctly."""
    gen = torch.Generator().manual_seed(0)
    method = fp8.Fp8LinearMethod("dynamic")
    layer = _layer(method, [256, 128], 256, "cuda", gen)
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.zeros(384, dtype=torch.bfloat16, device="cuda")
    method.apply(layer, x, bias)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = method.apply(layer, x, bias)
    x.copy_(torch.randn(4, 256, generator=gen).to(torch.bfloat16) * 3)
    graph.replay()
    ref = _reference(method, layer, x, bias)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_cpu_layers_take_the_reference():
    gen = torch.Generator().manual_seed(1)
    method = fp8.Fp8LinearMethod("dynamic")
    layer = _layer(method, [64], 64, "cpu", gen, torch.float32)
    assert not layer.fp8_scaled_mm
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    assert fp8._scaled_mm_mode(layer, x, "dynamic") is None


def _cpu_scaled_mm_works() -> bool:
    try:
        one = torch.ones(16, 16).to(fp8.FP8)
        torch._scaled_mm(one, one.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0),
                         out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.parametrize("mode,per_token,static", [("tensor", False, False),
                                                   ("tensor", False, True),
                                                   ("row", False, False), ("row", True, False),
                                                   ("row", False, True)])
def test_scaled_mm_fp8_scales(mode, per_token, static):
    """``scaled_mm_fp8``'s scale shapes and quantization against the reference, on the
    device at hand (PyTorch's CPU ``_scaled_mm`` where it has one)."""
    device = "cuda" if HAS_FP8 else "cpu"
    if device == "cpu" and not _cpu_scaled_mm_works():
        pytest.skip("this PyTorch build has no CPU torch._scaled_mm and no fp8 GPU is here")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16).to(device)
    weight = (torch.randn(48, 64, generator=gen) * 0.05).to(fp8.FP8).to(device)
    row_scale = torch.rand(48, generator=gen) * 0.02 + 0.001
    if mode == "tensor":
        row_scale = row_scale[:1].repeat(48)
    row_scale = row_scale.to(device)
    x_scale = torch.tensor(0.02, device=device) if static else None
    out = fp8.scaled_mm_fp8(x, weight, row_scale, x_scale, per_token, mode)
    ref = fp8.fake_quantize_fp8(x, x_scale, per_token).double() @ (
        weight.double() * row_scale.double()[:, None]).t()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("rows,cols,per_token", [(1, 4096, False), (5, 300, False),
                                                 (3, 4096, True), (17, 2500, True),
                                                 (301, 40, False), (600, 24, False)])
def test_fused_dynamic_quantization_matches_torch(rows, cols, per_token):
    """The Triton quantizer (``triton_fp8``: per tensor, several programs of rows each, the
    last one short) against ``activation_scale`` + ``quantize_fp8``: the same scales and
    e4m3 codes (compiled on a GPU; the interpreter on CPU checks the scales and the
    indexing)."""
    from tests.kernels.test_triton_attention import DEVICE as device  # interpreter set-up
    from pagedllm.quant.triton_fp8 import quantize_fp8_dynamic
    gen = torch.Generator().manual_seed(rows * cols)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(torch.bfloat16).to(device)
    q, scale = quantize_fp8_dynamic(x, per_token)
    ref_scale = fp8.activation_scale(x, None, per_token)
    ref_q = fp8.quantize_fp8(x, ref_scale)
    assert scale.shape == ((rows, 1) if per_token else (1,))
    torch.testing.assert_close(scale.reshape(ref_scale.shape), ref_scale, rtol=1e-6, atol=0)
    same = (q.float() == ref_q.float()).float().mean().item()
    if device == "cuda":
        assert same > 0.999, same
    else:  # the interpreter's fp32 -> e4m3 cast mis-rounds ties and mantissa carries (a few
        # %: 127.9 -> 64); indexing, masking and the scale are what it can check
        assert same > 0.9, same
