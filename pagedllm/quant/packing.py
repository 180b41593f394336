"""Unpacking of int32 words holding 32/bits small integers, and the dequantize references.

GPTQ packs along the input dim (``qweight`` [in/pack, out]) and its zeros along the output
dim, value ``k`` of a word in bits ``[k*bits, (k+1)*bits)``. AWQ (GEMM layout) packs weights
and zeros along the output dim in the interleaved order 0 2 4 6 1 3 5 7 (value ``k`` of the
word is column ``AWQ_ORDER[k]``), which is what its CUDA kernel's fast int4->fp16 trick wants.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word slot k holds column AWQ_ORDER[k] of its 8


def unpack_int32(packed: torch.Tensor, bits: int, dim: int,
                 order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The int32 values in ``packed`` (int32), 32/bits per word, spread along ``dim``
    (which grows by 32/bits). ``order``: word slot k holds position ``order[k]``."""
    per = 32 // bits
    slots = list(range(per))
    if order is not None:  # position p sits in slot order.index(p)
        slots = [order.index(p) for p in range(per)]
    shifts = torch.tensor(slots, dtype=torch.int32, device=packed.device) * bits
    view = [1] * (packed.dim() + 1)
    view[dim + 1] = per
    values = (packed.unsqueeze(dim + 1) >> shifts.view(view)) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return values.reshape(shape)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``unpack_int32``'s inverse (natural order): 32/bits values along ``dim`` per int32
    word, value k of a word in bits [k*bits, (k+1)*bits)."""
    per = 32 // bits
    moved = values.movedim(dim, -1)
    shape = moved.shape
    groups = moved.reshape(*shape[:-1], shape[-1] // per, per).to(torch.int64)
    shifts = torch.arange(per, device=values.device, dtype=torch.int64) * bits
    words = ((groups & ((1 << bits) - 1)) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, zero_offset: int) -> torch.Tensor:
    """W [in, out] = (q - z[g]) * s[g] with g = g_idx[in]; ``zero_offset`` is 1 for the
    GPTQ v1 checkpoint format, which stores each zero point minus one."""
    q = unpack_int32(qweight, bits, 0)                          # [in, out]
    z = unpack_int32(qzeros, bits, 1) + zero_offset             # [groups, out]
    g = g_idx.long()
    return (q - z[g]).to(scales.dtype) * scales[g]


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """W [in, out] = (q - z) * s, zeros and scales repeated over each group of inputs."""
    q = unpack_int32(qweight, 4, 1, AWQ_ORDER)                  # [in, out]
    z = unpack_int32(qzeros, 4, 1, AWQ_ORDER).repeat_interleave(group_size, 0)
    return (q - z).to(scales.dtype) * scales.repeat_interleave(group_size, 0)
