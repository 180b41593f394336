"""The Triton GGUF dequantize kernel (``pagedllm/quant/triton_gguf.py``) against the torch
reference (``gguf_dequant.dequantize``, itself checked against the ``gguf`` package in
tests/quant/test_gguf.py) and, where it installs, the ``gguf`` package's own
``gguf.quants.dequantize``: random block bytes with finite fp16 scales, every covered type,
row counts that do and do not fill the kernel's row tile. Under Triton's interpreter on CPU;
compiled on a GPU (Llama-3-8B-sized rows there)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU

tg = pytest.importorskip("pagedllm.quant.triton_gguf")

from pagedllm.quant.gguf import GGUFLinearMethod  # noqa: E402
from pagedllm.quant.gguf_dequant import TYPES, dequantize  # noqa: E402

TYPE_IDS = {name: type_id for type_id, (name, _, _) in TYPES.items()}
# byte offsets of each type's fp16 fields (random bytes there could be inf or NaN)
HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def _blocks(kind: str, rows: int, blocks: int, seed: int) -> torch.Tensor:
    _, _, size = tg.KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, blocks, size), generator=g, dtype=torch.int32).to(
        torch.uint8)
    for offset in HALVES[kind]:
        scale = (torch.rand(rows, blocks, generator=g) * 0.02 + 0.001).to(torch.float16)
        raw[:, :, offset:offset + 2] = scale.view(torch.uint8).reshape(rows, blocks, 2)
    return raw


@pytest.mark.parametrize("kind", sorted(tg.KINDS))
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_dequantize_equals_reference(kind, rows):
    _, elements, _ = tg.KINDS[kind]
    raw = _blocks(kind, rows, 3, rows)
    ref = dequantize(raw, TYPE_IDS[kind], (rows, 3 * elements))
    out = tg.dequantize(raw.to(DEVICE), kind, torch.float32).cpu()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    half = tg.dequantize(raw.to(DEVICE), kind, torch.bfloat16).cpu()
    torch.testing.assert_close(half.float(), ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kind", sorted(tg.KINDS))
def test_dequantize_equals_the_gguf_package(kind):
    gguf = pytest.importorskip("gguf")
    _, elements, _ = tg.KINDS[kind]
    raw = _blocks(kind, 4, 2, 99)
    ref = gguf.quants.dequantize(raw.reshape(4, -1).numpy(),
                                 gguf.GGMLQuantizationType[kind])
    out = tg.dequantize(raw.to(DEVICE), kind, torch.float32).cpu().numpy()
    np.testing.assert_allclose(out, ref.reshape(4, 2 * elements), rtol=1e-5, atol=1e-6)


def test_a_wrong_block_size_is_refused():
    with pytest.raises(ValueError, match="Q4_K blocks are 144 bytes, got 143"):
        tg.dequantize(torch.zeros(1, 1, 143, dtype=torch.uint8), "Q4_K", torch.float32)


def test_method_apply_takes_the_kernel_on_cuda(monkeypatch):
    """``GGUFLinearMethod.apply`` dequantizes through the kernel on CUDA (covered types) and
    equals the torch reference; on CPU the reference runs."""
    calls = []
    real = tg.dequantize
    monkeypatch.setattr(tg, "dequantize", lambda *a: calls.append(a[1]) or real(*a))
    raw = _blocks("Q6_K", 6, 2, 5)
    method = GGUFLinearMethod(TYPE_IDS["Q6_K"])
    layer = SimpleNamespace(weight=raw.to(DEVICE))
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(3, 512).to(dtype).to(DEVICE)
    ref = x.double().cpu() @ dequantize(raw, TYPE_IDS["Q6_K"], (6, 512)).double().t()
    out = method.apply(layer, x, None).cpu().double()
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if ON_GPU else 1e-5)
    assert calls == (["Q6_K"] if ON_GPU else [])


@pytest.mark.skipif(not ON_GPU, reason="large rows need a GPU")
@pytest.mark.parametrize("kind", sorted(tg.KINDS))
def test_llama_sized_rows(kind):
    _, elements, _ = tg.KINDS[kind]
    blocks = 4096 // elements
    raw = _blocks(kind, 1024, blocks, 7)
    ref = dequantize(raw.cuda(), TYPE_IDS[kind], (1024, 4096))
    torch.testing.assert_close(tg.dequantize(raw.cuda(), kind, torch.float32), ref,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the engine takes the kernel by itself")
def test_cpu_engine_through_the_kernel_equals_reference(tmp_path, monkeypatch):
    """The whole CPU engine with its GGUF layers dequantized by the Triton kernel (the
    interpreter standing in for CUDA) gives the torch reference's greedy tokens."""
    pytest.importorskip("gguf")
    from pagedllm.quant import kernels
    from tests.quant.gguf_files import write_gguf
    from tests.quant.test_quantized_models import _engine_greedy
    path = write_gguf("llama", tmp_path / "m.gguf", {"attn_output": "Q5_K", "ffn_down": "Q6_K",
                                                     "ffn": "Q4_K", "*": "Q8_0"})
    reference = _engine_greedy(path, device="cpu")
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "_serves", lambda x: x.dtype == torch.float32)
    kinds = []
    real = tg.dequantize
    monkeypatch.setattr(tg, "dequantize", lambda *a: kinds.append(a[1]) or real(*a))
    assert _engine_greedy(path, device="cpu") == reference
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0"} <= set(kinds)
