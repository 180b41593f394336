"""GGML block formats -> float32, in torch (llama.cpp's ``ggml-common.h`` layouts).

Each quantized type stores a row as blocks of ``BLOCK[type] = (elements, bytes)``; the
functions take the raw bytes as uint8 ``[n_blocks, bytes]`` and return ``[n_blocks,
elements]`` float32. Legacy types (32 elements): a float16 scale ``d`` (and a float16 ``m``
for the ``_1`` types) and 4/5/8-bit codes, value = d * q (+ m), with q offset by half the
range for the ``_0`` types. K-quants (256 elements) nest 16 or 8 sub-blocks whose 4 / 6 /
8-bit scales (and mins) are multiplied by float16 super-scales ``d`` / ``dmin``.

Written from the published layouts (torch, so the same code runs on any device);
``tests/quant/test_gguf.py`` checks every type against the ``gguf`` package's
``gguf.quants.dequantize``.
"""
from __future__ import annotations

import torch

# GGMLQuantizationType value -> (name, elements per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
         2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
         8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
         12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1] float32 (little-endian float16)."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: the low nibbles are elements 0-15, the high 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _steps(count: int, step: int, device: torch.device) -> torch.Tensor:
    """Shifts 0, step, 2*step, ... as a [1, 1, count, 1] uint8 tensor, made on the device by
    a kernel (no host copy, so dequantizing inside a CUDA graph capture works)."""
    return torch.arange(0, count * step, step, device=device).to(torch.uint8).view(1, 1, -1, 1)


def _bits(raw: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] bits, bit j of byte i at 8i + j (little-endian bit order)."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).reshape(raw.shape[0], -1)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[n, 32k] bytes -> [n, 128k] 2-bit codes: each 32-byte chunk gives 128 elements, shift
    0 of its bytes first, then shift 2, 4, 6 (the K-quants' 2-bit plane order)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, -1, 1, 32)
    shifts = _steps(4, 2, qs.device)
    return ((chunks >> shifts) & 3).reshape(n, -1)


def q2_k(b: torch.Tensor) -> torch.Tensor:
    """scales[16] (low nibble scale, high nibble min of each 16 elements), qs[64], d, dmin."""
    scales, q = b[:, :16], _crumbs(b[:, 16:80]).float()
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    sub = (d * (scales & 0x0F).float()).repeat_interleave(16, 1)
    low = (dmin * (scales >> 4).float()).repeat_interleave(16, 1)
    return sub * q - low


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 six-bit scales: low 4 bits from bytes 0-7 (low nibbles for scales 0-7,
    high for 8-15), high 2 bits from bytes 8-11 (byte 8 + i % 4, bit pair i // 4)."""
    low = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=1)
    i = torch.arange(16, device=s.device)
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).to(torch.uint8)) & 3
    return (low | (high << 4)).float() - 32


def q3_k(b: torch.Tensor) -> torch.Tensor:
    """hmask[32], qs[64], scales[12], d: q = 2-bit code - 4 where the hmask bit is clear."""
    hmask, q = _bits(b[:, :32]), _crumbs(b[:, 32:96])
    # element e's high bit: bit (e // 32) of hmask byte e % 32
    n = b.shape[0]
    high = hmask.reshape(n, 32, 8).transpose(1, 2).reshape(n, 256)
    values = q.float() - 4 * (1 - high.float())
    scale = (_f16(b[:, 108:110]) * _q3_k_scales(b[:, 96:108])).repeat_interleave(16, 1)
    return scale * values


def k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte Q4_K / Q5_K field -> 8 six-bit scales and 8 six-bit mins: sub-blocks 0-3
    in the low 6 bits of bytes 0-3 / 4-7; 4-7 in the nibbles of bytes 8-11 plus the top 2
    bits of bytes 0-3 / 4-7."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale.float(), mins.float()


def _k4_planes(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 256] 4-bit codes: each 32 bytes give 64 elements, low nibbles
    then high nibbles."""
    chunks = qs.reshape(qs.shape[0], 4, 1, 32)
    shifts = _steps(2, 4, qs.device)
    return ((chunks >> shifts) & 0x0F).reshape(qs.shape[0], 256)


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, mins = k4_scale_min(b[:, 4:16])
    return ((d * scale).repeat_interleave(32, 1) * q.float()
            - (dmin * mins).repeat_interleave(32, 1))


def q4_k(b: torch.Tensor) -> torch.Tensor:
    """d, dmin, scales[12], qs[128]: 8 sub-blocks of 32, value = d*sc*q - dmin*m."""
    return _k_affine(b, _k4_planes(b[:, 16:144]))


def q5_k(b: torch.Tensor) -> torch.Tensor:
    """d, dmin, scales[12], qh[32], qs[128]: Q4_K plus a fifth bit, bit (e // 32) of qh
    byte e % 32."""
    n = b.shape[0]
    high = _bits(b[:, 16:48]).reshape(n, 32, 8).transpose(1, 2).reshape(n, 256)
    return _k_affine(b, _k4_planes(b[:, 48:176]) | (high << 4))


def q6_k(b: torch.Tensor) -> torch.Tensor:
    """ql[128], qh[64], scales int8[16], d: 6-bit codes - 32, 16 sub-blocks of 16. Each half
    of 128 elements takes 64 ql bytes (low nibbles: elements 0-63, high: 64-127) and 32 qh
    bytes (bit pairs 0, 1, 2, 3 for the four runs of 32)."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    low = ((ql >> _steps(2, 4, b.device))
           & 0x0F).reshape(n, 2, 128)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    pairs = _steps(4, 2, b.device)
    high = ((qh >> pairs) & 3).reshape(n, 2, 128)
    q = (low | (high << 4)).reshape(n, 256).float() - 32
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return (_f16(b[:, 208:210]) * scales).repeat_interleave(16, 1) * q


_BLOCK_FNS = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0,
              "Q2_K": q2_k, "Q3_K": q3_k, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def dequantize(raw: torch.Tensor, type_id: int, shape: tuple[int, ...],
               name: str = "tensor") -> torch.Tensor:
    """The float32 values of a GGML tensor: ``raw`` its bytes (uint8), ``shape`` its torch
    shape (rows first; the last dim is the one blocks run along)."""
    if type_id not in TYPES:
        raise ValueError(f"GGUF tensor {name!r} has GGML type {type_id}, which is not supported;"
                         " supported: " + ", ".join(t[0] for t in TYPES.values()))
    kind, elements, size = TYPES[type_id]
    raw = raw.contiguous().reshape(-1)
    if kind in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        return raw.view(dtype).float().reshape(shape)
    if shape[-1] % elements or raw.numel() % size:
        raise ValueError(f"GGUF tensor {name!r} ({kind}): rows of {shape[-1]} do not fill whole "
                         f"blocks of {elements}")
    return _BLOCK_FNS[kind](raw.reshape(-1, size)).reshape(shape)
