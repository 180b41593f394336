"""Test-side quantizers and packers that follow the published checkpoint layouts, written
from the format descriptions (not from pagedllm's unpacking code), bit by bit with numpy.

- GPTQ (AutoGPTQ ``pack`` / optimum, format ``gptq``): ``qweight`` int32 [in/pack, out], input
  ``i`` in word ``i // pack`` at bits ``(i % pack) * bits``; ``qzeros`` int32
  [groups, out/pack], column ``j`` in word ``j // pack`` at bits ``(j % pack) * bits``, each
  zero stored minus one (``gptq_v2``: as is); ``scales`` fp16 [groups, out]; ``g_idx`` int32.
- AWQ (AutoAWQ ``WQLinear_GEMM``): ``qweight`` int32 [in, out/8] and ``qzeros`` int32
  [groups, out/8], word slot ``k`` (bits 4k..4k+3) holding column ``8c + [0,2,4,6,1,3,5,7][k]``;
  ``scales`` fp16 [groups, out].
- fp8 (vLLM / llm-compressor ``fp8``): ``weight`` float8_e4m3fn [out, in], ``weight_scale``
  fp32 scalar, ``input_scale`` fp32 scalar when activations are static.

Each quantizer returns the checkpoint tensors and the dequantized fp32 [out, in] weight,
computed from the integer codes (not the packed words): the oracle's weights.
"""
from __future__ import annotations

import numpy as np
import torch

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] codes -> [rows / pack, cols] uint32 words (GPTQ qweight)."""
    pack = 32 // bits
    words = np.zeros((codes.shape[0] // pack, codes.shape[1]), dtype=np.uint64)
    for i in range(codes.shape[0]):
        words[i // pack] |= (codes[i].astype(np.uint64) & ((1 << bits) - 1)) << ((i % pack) * bits)
    return words & 0xFFFFFFFF


def pack_cols(codes: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """[rows, cols] codes -> [rows, cols / pack] uint32 words; slot k of word c holds column
    c*pack + order[k] (order: identity for GPTQ zeros, AWQ_PACK_ORDER for AWQ)."""
    pack = 32 // bits
    order = order or list(range(pack))
    words = np.zeros((codes.shape[0], codes.shape[1] // pack), dtype=np.uint64)
    for c in range(codes.shape[1] // pack):
        for k in range(pack):
            col = codes[:, c * pack + order[k]].astype(np.uint64) & ((1 << bits) - 1)
            words[:, c] |= col << (k * bits)
    return words & 0xFFFFFFFF


def _group_params(w: torch.Tensor, bits: int, sym: bool, min_zero: int):
    """Scale (fp16-rounded) and zero of each column of ``w`` [rows, out] (one group)."""
    maxq = 2 ** bits - 1
    if sym:
        scale = (w.abs().amax(0) * 2 / maxq).clamp(min=1e-5)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo, hi = w.amin(0).clamp(max=0), w.amax(0).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-5)
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    scale = scale.half().float()
    return scale, zero


def gptq_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 32,
                  desc_act: bool = False, sym: bool = True, v2: bool = False,
                  seed: int = 0) -> tuple[dict, torch.Tensor]:
    """GPTQ tensors of an [out, in] weight (round-to-nearest codes; what GPTQ's error
    feedback changes is only which codes are chosen). ``desc_act``: a random input order
    assigns the groups. The v1 format cannot store a zero point of 0 (it stores zero - 1):
    asymmetric zeros start at 1 there."""
    w = weight.t().float()  # [in, out]
    n_in, maxq = w.shape[0], 2 ** bits - 1
    group = n_in if group_size == -1 else group_size
    if desc_act:
        perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n_in) // group).int()
    else:
        g_idx = (torch.arange(n_in) // group).int()
    groups = n_in // group
    scales, zeros = torch.empty(groups, w.shape[1]), torch.empty(groups, w.shape[1])
    for g in range(groups):
        scales[g], zeros[g] = _group_params(w[g_idx == g], bits, sym, 0 if v2 else 1)
    s, z = scales[g_idx.long()], zeros[g_idx.long()]
    codes = torch.clamp(torch.round(w / s) + z, 0, maxq)
    deq = ((codes - z) * s).t().contiguous()
    stored_zeros = zeros.numpy().astype(np.int64) - (0 if v2 else 1)
    tensors = {"qweight": _to_int32(pack_rows(codes.numpy().astype(np.int64), bits)),
               "qzeros": _to_int32(pack_cols(stored_zeros, bits)),
               "scales": scales.half(), "g_idx": g_idx}
    return tensors, deq


def awq_quantize(weight: torch.Tensor, group_size: int = 32) -> tuple[dict, torch.Tensor]:
    """AWQ GEMM tensors (4 bit, zero points) of an [out, in] weight."""
    w = weight.t().float()  # [in, out]
    groups = w.shape[0] // group_size
    scales, zeros = torch.empty(groups, w.shape[1]), torch.empty(groups, w.shape[1])
    for g in range(groups):
        rows = w[g * group_size:(g + 1) * group_size]
        scales[g], zeros[g] = _group_params(rows, 4, sym=False, min_zero=0)
    s = scales.repeat_interleave(group_size, 0)
    z = zeros.repeat_interleave(group_size, 0)
    codes = torch.clamp(torch.round(w / s) + z, 0, 15)
    deq = ((codes - z) * s).t().contiguous()
    tensors = {"qweight": _to_int32(pack_cols(codes.numpy().astype(np.int64), 4,
                                              AWQ_PACK_ORDER)),
               "qzeros": _to_int32(pack_cols(zeros.numpy().astype(np.int64), 4,
                                             AWQ_PACK_ORDER)),
               "scales": scales.half()}
    return tensors, deq


def fp8_quantize(weight: torch.Tensor, input_scale: float | None = None,
                 per_channel: bool = False) -> tuple[dict, torch.Tensor]:
    """Per-tensor e4m3 weight and scale (max |w| / 448), or with ``per_channel`` one scale
    per output row ([out, 1], fbgemm_fp8); the dequantized weight is the fp8 value times the
    scale in fp32."""
    if per_channel:
        scale = weight.float().abs().amax(1, keepdim=True) / 448.0
    else:
        scale = weight.float().abs().max() / 448.0
    q = (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    tensors = {"weight": q, "weight_scale": scale if per_channel else scale.reshape(())}
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor(float(input_scale))
    return tensors, q.float() * scale
