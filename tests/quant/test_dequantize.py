"""Each dequantize of ``pagedllm.quant`` against a straightforward per-element reference
(Python integer bit operations on the packed words, one element at a time)."""
from __future__ import annotations

import math

import pytest
import torch

from pagedllm.quant.fp8 import fake_quantize_fp8
from pagedllm.quant.packing import awq_dequantize, gptq_dequantize, unpack_int32

AWQ_SLOT_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ: slot k holds column [0,2,4,6,1,3,5,7][k]


def _words(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)


def _field(word: int, slot: int, bits: int) -> int:
    return ((word & 0xFFFFFFFF) >> (slot * bits)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_unpack_matches_bit_fields(bits, dim):
    packed, per = _words((3, 5), bits * 10 + dim), 32 // bits
    values = unpack_int32(packed, bits, dim)
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            word = packed[r // per, c] if dim == 0 else packed[r, c // per]
            slot = (r if dim == 0 else c) % per
            assert values[r, c] == _field(int(word), slot, bits)


@pytest.mark.parametrize("bits,group,desc_act,offset", [(4, 4, False, 1), (8, 4, True, 1),
                                                        (4, -1, False, 1), (2, 8, True, 0)])
def test_gptq_dequantize_matches_reference(bits, group, desc_act, offset):
    per, n_in, n_out = 32 // bits, 16, 2 * (32 // bits)
    groups = 1 if group == -1 else n_in // group
    qweight, qzeros = _words((n_in // per, n_out), 1), _words((groups, n_out // per), 2)
    scales = torch.rand(groups, n_out, generator=torch.Generator().manual_seed(3))
    g_idx = torch.arange(n_in) // (n_in if group == -1 else group)
    if desc_act:
        g_idx = g_idx[torch.randperm(n_in, generator=torch.Generator().manual_seed(4))]
    out = gptq_dequantize(qweight, qzeros, scales, g_idx.int(), bits, offset)
    for i in range(n_in):
        for j in range(n_out):
            g = int(g_idx[i])
            q = _field(int(qweight[i // per, j]), i % per, bits)
            z = _field(int(qzeros[g, j // per]), j % per, bits) + offset
            assert out[i, j] == (q - z) * scales[g, j]


def test_awq_dequantize_matches_reference():
    n_in, n_out, group = 8, 16, 4
    qweight, qzeros = _words((n_in, n_out // 8), 5), _words((n_in // group, n_out // 8), 6)
    scales = torch.rand(n_in // group, n_out, generator=torch.Generator().manual_seed(7))
    out = awq_dequantize(qweight, qzeros, scales, group)
    for i in range(n_in):
        for j in range(n_out):
            slot = AWQ_SLOT_OF_COLUMN[j % 8]
            q = _field(int(qweight[i, j // 8]), slot, 4)
            z = _field(int(qzeros[i // group, j // 8]), slot, 4)
            assert out[i, j] == (q - z) * scales[i // group, j]


def _e4m3_round(x: float) -> float:
    """Nearest e4m3fn value (ties to even), saturating at 448: 3 mantissa bits, normal
    exponents from -6, subnormal steps of 2**-9."""
    mag = min(abs(x), 448.0)
    if mag == 0:
        return 0.0
    step = 2.0 ** (max(math.floor(math.log2(mag)), -6) - 3)
    return math.copysign(round(mag / step) * step, x)


@pytest.mark.parametrize("scale", [None, 0.01])
def test_fp8_fake_quantize_matches_reference(scale):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(8)) * 3
    out = fake_quantize_fp8(x, None if scale is None else torch.tensor(scale))
    s = float(x.abs().max()) / 448.0 if scale is None else scale
    s = float(torch.tensor(s, dtype=torch.float32))
    for value, got in zip(x.flatten().tolist(), out.flatten().tolist()):
        scaled = float(torch.tensor(value, dtype=torch.float32) / torch.tensor(s))
        assert got == pytest.approx(_e4m3_round(scaled) * s, rel=1e-6, abs=0)
