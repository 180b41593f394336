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
    size = tg.KINDS[kind][2]
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
    elements = tg.KINDS[kind][1]
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
    elements = tg.KINDS[kind][1]
    raw = _blocks(kind, 4, 2, 99)
    ref = gguf.quants.dequantize(raw.reshape(4, -1).numpy(),
                                 gguf.GGMLQuantizationType[kind])
    out = tg.dequantize(raw.to(DEVICE), kind, torch.float32).cpu().numpy()
    np.testing.assert_allclose(out, ref.reshape(4, 2 * elements), rtol=1e-5, atol=1e-6)


def test_a_wrong_block_size_is_refused():
    with pytest.raises(ValueError, match="Q4_K blocks are 144 bytes, got 143"):
        tg.dequantize(torch.zeros(1, 1, 143, dtype=torch.uint8), "Q4_K", torch.float32)
    with pytest.raises(ValueError, match=r"x is \(1, 255\), the weight takes \(1, 256\)"):
        tg.gemv(torch.zeros(1, 255), torch.zeros(1, 1, 144, dtype=torch.uint8), "Q4_K")


@pytest.mark.parametrize("kind", sorted(tg.KINDS))
@pytest.mark.parametrize("rows,blocks,dtype", [(5, 3, torch.float32), (16, 2, torch.bfloat16),
                                               (3, 9, torch.float32)])
@pytest.mark.parametrize("gated,bias", [(False, False), (True, True)])
def test_gemv_equals_reference(kind, rows, blocks, dtype, gated, bias, monkeypatch):
    """The one-row GEMV (each block decoded where it is read, split over the blocks: 9 blocks
    over several programs, with ``GEMV_WAVES`` forcing splits on the interpreter's 4 "SMs")
    with the epilogue, against x @ the reference's dequantized weight."""
    monkeypatch.setattr(tg, "GEMV_BLOCK_R", 4)
    elements = tg.KINDS[kind][1]
    rows = rows * 2 if gated else rows
    raw = _blocks(kind, rows, blocks, rows + blocks)
    g = torch.Generator().manual_seed(3)
    # small x: outputs of a few units, so that the gated SiLU does not flatten them to zero
    x = (torch.randn(1, blocks * elements, generator=g) * 0.005).to(dtype)
    b = (torch.randn(rows, generator=g) * 0.1).to(dtype) if bias else None
    ref = x.double() @ dequantize(raw, TYPE_IDS[kind], (rows, blocks * elements)).double().t()
    if b is not None:
        ref = ref + b.double()
    if gated:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    out = tg.gemv(x.to(DEVICE), raw.to(DEVICE), kind, b.to(DEVICE) if bias else None,
                  gated).cpu()
    assert out.shape == ref.shape and out.dtype == dtype
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("rows,blocks,block_r", [(5, 3, 4), (16, 2, 16), (40, 9, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4k_vector_gemv_equals_reference(rows, blocks, block_r, dtype, monkeypatch):
    """The Q4_K GEMV that reads whole blocks as 16-byte vectors (``Q4K_VECTOR``, a tuning
    candidate) against x @ the reference's dequantized weight: short row tiles, several
    splits."""
    monkeypatch.setattr(tg, "Q4K_VECTOR", (True, block_r, 4))
    monkeypatch.setattr(tg, "GEMV_WAVES", 4)
    raw = _blocks("Q4_K", rows, blocks, rows * 7 + blocks)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, blocks * 256, generator=g).to(dtype)
    ref = x.double() @ dequantize(raw, TYPE_IDS["Q4_K"], (rows, blocks * 256)).double().t()
    out = tg.gemv(x.to(DEVICE), raw.to(DEVICE), "Q4_K").cpu()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_method_apply_takes_the_kernel_on_cuda(monkeypatch):
    """``GGUFLinearMethod.apply`` dequantizes through the kernel on CUDA (covered types; one
    row: the GEMV) and equals the torch reference; on CPU the reference runs."""
    calls = []
    real, real_gemv = tg.dequantize, tg.gemv
    monkeypatch.setattr(tg, "dequantize", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(tg, "gemv", lambda *a: calls.append("gemv") or real_gemv(*a))
    raw = _blocks("Q6_K", 6, 2, 5)
    method = GGUFLinearMethod(TYPE_IDS["Q6_K"])
    layer = SimpleNamespace(weight=raw.to(DEVICE))
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(3, 512).to(dtype).to(DEVICE)
    ref = x.double().cpu() @ dequantize(raw, TYPE_IDS["Q6_K"], (6, 512)).double().t()
    out = method.apply(layer, x, None).cpu().double()
    assert ((out - ref).norm() / ref.norm()).item() < (1e-2 if ON_GPU else 1e-5)
    one = method.apply(layer, x[:1], None).cpu().double()
    assert ((one - ref[:1]).norm() / ref[:1].norm()).item() < (1e-2 if ON_GPU else 1e-5)
    assert calls == (["Q6_K", "gemv"] if ON_GPU else [])


@pytest.mark.skipif(not ON_GPU, reason="large rows need a GPU")
@pytest.mark.parametrize("kind", sorted(tg.KINDS))
def test_llama_sized_rows(kind):
    elements = tg.KINDS[kind][1]
    blocks = 4096 // elements
    raw = _blocks(kind, 1024, blocks, 7)
    ref = dequantize(raw.cuda(), TYPE_IDS[kind], (1024, 4096))
    torch.testing.assert_close(tg.dequantize(raw.cuda(), kind, torch.float32), ref,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the engine takes the kernel by itself")
def test_cpu_engine_through_the_kernels_equals_reference(tmp_path, monkeypatch):
    """The whole CPU engine with its GGUF layers on the Triton kernels (the interpreter
    standing in for CUDA: the prompt's prefill dequantizes, each decode step of one row takes
    the GEMV) gives the torch reference's greedy tokens."""
    pytest.importorskip("gguf")
    from pagedllm.quant import kernels
    from tests.quant.gguf_files import write_gguf
    path = write_gguf("llama", tmp_path / "m.gguf", {"attn_output": "Q5_K", "ffn_down": "Q6_K",
                                                     "ffn": "Q4_K", "*": "Q8_0"})
    reference = _one_prompt(path)
    monkeypatch.setattr(kernels, "_on_cuda", lambda t: True)
    monkeypatch.setattr(kernels, "_serves", lambda x: x.dtype == torch.float32)
    kinds = []
    real, real_gemv = tg.dequantize, tg.gemv
    monkeypatch.setattr(tg, "dequantize", lambda *a: kinds.append(a[1]) or real(*a))
    monkeypatch.setattr(tg, "gemv", lambda *a: kinds.append("gemv " + a[2]) or real_gemv(*a))
    assert _one_prompt(path) == reference
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "gemv Q4_K", "gemv Q5_K", "gemv Q6_K",
            "gemv Q8_0"} <= set(kinds)


def _one_prompt(path) -> list[int]:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=str(path), dtype="float32", block_size=8, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[5, 9, 13, 17]], sampling_params=params,
                       use_tqdm=False)
    return list(out[0].outputs[0].token_ids)
