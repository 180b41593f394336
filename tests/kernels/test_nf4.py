"""The Triton bitsandbytes 4-bit kernels (``pagedllm/quant/triton_nf4.py``: GEMV, dequantize)
against the torch reference (``bitsandbytes.dequantize_4bit`` then a float64 matmul), on random
packed bytes, absmax scales and the NF4 codebook (and an arbitrary 16-value one: FP4 runs the
same lookup). Without a GPU the kernels run under Triton's interpreter on tiny shapes; on a
GPU also Llama-3-8B shapes, and the CUDA engine's NF4 layer through the method's ``apply``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU, TOL, _rel_err

nf4 = pytest.importorskip("pagedllm.quant.triton_nf4")

from pagedllm.quant import triton_wna16 as wq  # noqa: E402
from pagedllm.quant.bitsandbytes import BnB4bitLinearMethod, dequantize_4bit  # noqa: E402

gpu = pytest.mark.skipif(not ON_GPU, reason="large shapes need a GPU")

NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


@pytest.fixture(autouse=True, params=["default-split-k", "small-split-k"])
def split_k(request, monkeypatch):
    """Each case with the split sizes of the real shapes, and with splits small enough that
    tiny shapes split K too (the partial sums and the fold are exercised)."""
    if request.param == "small-split-k":
        monkeypatch.setattr(wq, "SPLIT_MIN_K", 32)
        monkeypatch.setattr(wq, "SPLIT_K_PER_ROW", 1)
    return request.param


def _layer(n, k, seed, code=None):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand(n, k // 64, generator=g) * 0.05 + 0.01
    code = torch.tensor(NF4_CODE) if code is None else code
    return weight.to(DEVICE), absmax.to(DEVICE), code.to(DEVICE)


def _check(m, n, k, dtype, gated=False, bias=False, gemv=None, code=None, seed=0):
    weight, absmax, code = _layer(n, k, seed + m + n + k, code)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    out = nf4.nf4_matmul(x, weight, absmax, code, bias=b, gated=gated, gemv=gemv)
    ref = x.double().cpu() @ dequantize_4bit(weight.cpu(), absmax.cpu(), code.cpu()).double().t()
    if b is not None:
        ref = ref + b.double().cpu()
    if gated:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert _rel_err(out.cpu(), ref.to(dtype)) < max(TOL[dtype], 1e-4)


@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (1, torch.bfloat16), (3, torch.float16),
                                     (1, torch.float16), (16, torch.bfloat16),
                                     (5, torch.float32), (20, torch.bfloat16)])
@pytest.mark.parametrize("n,k", [(64, 256), (96, 128), (40, 192)])
def test_matmul_equals_reference(m, dtype, n, k):
    """(64, 256): whole tiles, the GEMV's EVEN path; 96 and 40 rows: masked tiles; 3 to 16
    rows: the GEMM (fp32: IEEE dots); 20: the dequantize kernel, then the matmul."""
    _check(m, n, k, dtype)


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_gemv_epilogue(gated, bias):
    """Bias and the gated SiLU (gate and up halves, each a whole number of 64-column tiles,
    so the fold applies them) through the GEMV; without the fold, the reduce launch."""
    _check(1, 128, 256, torch.float32, gated=gated, bias=bias)


def test_any_codebook_and_forced_paths():
    code = torch.linspace(-1.5, 2.0, 16) ** 3  # not NF4: the lookup is by table only
    _check(1, 64, 128, torch.float32, code=code, gemv=False)
    _check(1, 64, 128, torch.float32, code=code, gemv=True)


@pytest.mark.parametrize("gated,bias", [(True, True), (False, True)])
def test_gemm_epilogue(gated, bias):
    _check(6, 128, 256, torch.float32, gated=gated, bias=bias)


def test_method_apply_runs_the_kernels_on_cuda(monkeypatch):
    """``BnB4bitLinearMethod.apply`` on CUDA takes the Triton kernels (one row: the GEMV, five:
    the GEMM, 80: the dequantize kernel) and equals its torch reference; on CPU the reference
    runs."""
    weight, absmax, code = _layer(64, 128, 3)
    layer = SimpleNamespace(weight=weight, weight_absmax=absmax, weight_code=code,
                            prefix="model.layers.0.mlp.down_proj")
    calls = []
    monkeypatch.setattr(nf4, "_gemv", lambda *a, **kw: calls.append("gemv") or
                        _real_gemv(*a, **kw))
    monkeypatch.setattr(nf4, "_gemm", lambda *a, **kw: calls.append("gemm") or
                        _real_gemm(*a, **kw))
    monkeypatch.setattr(nf4, "dequantize", lambda *a, **kw: calls.append("dequantize") or
                        _real_dequantize(*a, **kw))
    method = BnB4bitLinearMethod()
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    for rows in (1, 5, 80):
        x = torch.randn(rows, 128).to(dtype).to(DEVICE)
        ref = x.double().cpu() @ dequantize_4bit(weight.cpu(), absmax.cpu(),
                                                 code.cpu()).double().t()
        assert _rel_err(method.apply(layer, x, None).cpu(), ref.to(dtype)) < TOL[dtype]
    assert calls == (["gemv", "gemm", "dequantize"] if ON_GPU else [])


_real_gemv, _real_gemm, _real_dequantize = nf4._gemv, nf4._gemm, nf4.dequantize


@gpu
@pytest.mark.parametrize("m", [1, 16, 64, 100])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_llama_shapes(m, n, k):
    _check(m, n, k, torch.bfloat16)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the engine takes the kernels by itself")
def test_cpu_engine_through_the_kernels_equals_reference(tmp_path, monkeypatch, split_k):
    """The whole CPU engine with its bitsandbytes 4-bit layers sent through the Triton kernels
    (the interpreter standing in for CUDA: the GEMV at one-row decode steps, the GEMM for a
    batched step, the dequantize kernel for prefills) gives the reference's greedy tokens."""
    pytest.importorskip("bitsandbytes")
    from pagedllm.quant import kernels
    from tests.quant.test_bitsandbytes import bnb_checkpoint
    from tests.quant.test_quantized_models import _engine_greedy
    if split_k != "small-split-k":
        pytest.skip("one split setting is enough here")
    path = bnb_checkpoint("llama", tmp_path / "nf4", load_in_4bit=True,
                          bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.float32)
    reference = [_engine_greedy(path, one_at_a_time=True, device="cpu"),
                 _engine_greedy(path, device="cpu")]
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "_serves", lambda x: x.dtype == torch.float32)
    calls = []
    for name in ("_gemv", "_gemm", "dequantize"):
        real = getattr(nf4, name)
        monkeypatch.setattr(nf4, name, lambda *a, _n=name, _r=real, **kw:
                            calls.append(_n) or _r(*a, **kw))
    assert [_engine_greedy(path, one_at_a_time=True, device="cpu"),
            _engine_greedy(path, device="cpu")] == reference
    assert {"_gemv", "_gemm", "dequantize"} <= set(calls)
