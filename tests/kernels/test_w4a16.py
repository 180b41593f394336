"""The Triton W4A16 kernel (``pagedllm/quant/triton_w4a16.py``) against the torch
dequantize-then-matmul references of ``pagedllm/quant/packing.py``, on random packed weights
of the GPTQ (groups, -1, desc_act g_idx, v1 zero offset) and AWQ layouts; and the CUDA engine's
greedy tokens on tiny GPTQ / AWQ checkpoints against the CPU engine's (the reference path on
both until the kernel is wired in). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from pagedllm.quant.packing import awq_dequantize, gptq_dequantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _words(shape, g):
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(
        torch.int32).cuda()


def _check(out, x, w_in_out):
    ref = x.float() @ w_in_out.to(x.dtype).float()
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 33, 130])
@pytest.mark.parametrize("k,n,group,desc_act", [(256, 192, 32, False), (1024, 448, 128, True),
                                                (512, 64, -1, False), (4096, 4096, 128, False)])
def test_gptq_layout_matches_reference(dtype, m, k, n, group, desc_act):
    from pagedllm.quant.triton_w4a16 import w4a16_matmul
    g = torch.Generator().manual_seed(k + n + m)
    groups = 1 if group == -1 else k // group
    qweight, qzeros = _words((k // 8, n), g), _words((groups, n // 8), g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).to(dtype).cuda()
    g_idx = torch.arange(k) // (k if group == -1 else group)
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    g_idx = g_idx.int().cuda()
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    out = w4a16_matmul(x, qweight, qzeros, scales, awq=False, g_idx=g_idx, zero_offset=1)
    _check(out, x, gptq_dequantize(qweight, qzeros, scales.float(), g_idx, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 77])
@pytest.mark.parametrize("k,n,group", [(256, 192, 32), (4096, 4096, 128), (2048, 1408, 64)])
def test_awq_layout_matches_reference(dtype, m, k, n, group):
    from pagedllm.quant.triton_w4a16 import w4a16_matmul
    g = torch.Generator().manual_seed(k + n + m + 1)
    qweight, qzeros = _words((k, n // 8), g), _words((k // group, n // 8), g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.005).to(dtype).cuda()
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    out = w4a16_matmul(x, qweight, qzeros, scales, awq=True, group_size=group)
    _check(out, x, awq_dequantize(qweight, qzeros, scales.float(), group))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cuda_engine_greedy_equals_cpu(method, tmp_path):
    """fp32 both sides (the kernel's dot runs in IEEE fp32 then): same greedy tokens."""
    from tests.quant.checkpoints import quantized_checkpoint
    from tests.quant.test_quantized_models import _engine_greedy
    if method == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                  "sym": False}
        options = dict(bits=4, group_size=32, desc_act=True, sym=False)
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                  "version": "gemm"}
        options = dict(group_size=32)
    path, _ = quantized_checkpoint("llama", method, tmp_path / method, config, options)
    assert _engine_greedy(path, device="cuda") == _engine_greedy(path, device="cpu")
