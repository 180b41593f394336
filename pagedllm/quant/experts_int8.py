"""``--quantization experts_int8``: mixture-of-experts expert weights in int8, quantized at load.

What vLLM 0.6.3's ``experts_int8`` does, on an unquantized checkpoint: every routed expert's
gate/up and down projection is stored as int8 with one scale per output channel (row),
symmetric: ``scale = max|row| / 127``, ``q = clamp(round(row / scale), -127, 127)``; the
dense layers (attention, dense MLPs, shared experts, router, embeddings, LM head) stay
unquantized. Expert weights take a quarter of their fp32 / half of their bf16 memory.

Quantization runs per rank on the full-precision rows the layer's loader hands over: the
gate/up rows are whole output channels at any tensor-parallel size; a down row is this
rank's slice of the intermediate dim, so each rank's down scales cover its slice (as vLLM's).
The scales are computed in fp32. The expert loop reads dequantized experts
(``fp32(q) * scale`` rounded to the model dtype) one expert (or one gathered batch of
experts) at a time, so full-precision copies of all experts never exist at once. On CUDA
the fused MoE kernels read the int8 codes and scale each row's sums (``kernel_weights``).

The same storage with e4m3 codes (``scale = max|row| / 448``) is what ``--quantization fp8``
gives MoE experts of an unquantized checkpoint (``ExpertsInt8MoEMethod("fp8")``): fp8 weights,
activations in the model dtype (W8A16; the dense layers take fp8's W8A8).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.quant.base import LinearMethod, MoEMethod, QuantConfig, make_param
from pagedllm.quant.fp8 import FP8, FP8_MAX, quantize_fp8
from pagedllm.quant.unquantized import UNQUANTIZED, stored_rows

INT8_MAX = 127


def quantize_rows(weight: torch.Tensor, codes: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 or e4m3 values, fp32 scales [..., rows]) of ``weight`` [..., rows, cols], per
    row: the row's max |w| maps to 127 (rounded to the nearest integer) or to 448 (e4m3's
    largest, round to nearest even). An all-zero row gets the smallest positive scale (its
    values stay 0)."""
    w = weight.float()
    peak = INT8_MAX if codes == "int8" else FP8_MAX
    scale = (w.abs().amax(dim=-1) / peak).clamp_min(torch.finfo(torch.float32).tiny)
    if codes == "fp8":
        return quantize_fp8(w, scale.unsqueeze(-1)), scale
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fp32(q) * scale`` per row, in ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


class Int8Experts:
    """Stacked int8 (or e4m3) experts that dequantize what is indexed: ``w[e]`` is expert
    e's [rows, cols] matrix, ``w[ids]`` the [len(ids), rows, cols] batch."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.q, self.scale, self.dtype = q, scale, dtype
        self.shape = q.shape

    def __getitem__(self, index) -> torch.Tensor:
        return dequantize_rows(self.q[index], self.scale[index], self.dtype)


class ExpertsInt8MoEMethod(MoEMethod):
    """Expert weights quantized at load with a scale per row: int8 (``experts_int8``) or
    e4m3 codes (``--quantization fp8`` on MoE experts)."""

    def __init__(self, codes: str = "int8") -> None:
        self.codes = codes
        self.name = "experts_int8" if codes == "int8" else "fp8"
        self.code_dtype = torch.int8 if codes == "int8" else FP8

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size: int, dtype: torch.dtype) -> None:
        layer.compute_dtype = dtype
        shapes = {"gate_up_proj": (num_experts, 2 * intermediate_size, hidden_size),
                  "down_proj": (num_experts, hidden_size, intermediate_size)}
        for name, shape in shapes.items():
            setattr(layer, name, make_param(torch.zeros(shape, dtype=self.code_dtype)))
            # filled with the int8 values by the loader, never read from the checkpoint
            setattr(layer, f"{name}_scale", make_param(
                torch.ones(shape[:2], dtype=torch.float32), optional=True))

    def store(self, layer: nn.Module, name: str, expert: int | None, row_offset: int,
              value: torch.Tensor) -> None:
        q, scale = quantize_rows(value, self.codes)
        rows = value.shape[-2]
        stored_rows(getattr(layer, name).data, expert, row_offset, rows).copy_(q)
        stored_rows(getattr(layer, f"{name}_scale").data, expert, row_offset, rows,
                    row_dim=-1).copy_(scale)

    def expert_weights(self, layer: nn.Module):
        return (Int8Experts(layer.gate_up_proj, layer.gate_up_proj_scale, layer.compute_dtype),
                Int8Experts(layer.down_proj, layer.down_proj_scale, layer.compute_dtype))

    def kernel_weights(self, layer: nn.Module):
        """The codes and their row scales: the fused kernels dequantize as they read."""
        return (layer.gate_up_proj, layer.down_proj,
                (layer.gate_up_proj_scale, layer.down_proj_scale))


EXPERTS_INT8 = ExpertsInt8MoEMethod()
FP8_EXPERTS = ExpertsInt8MoEMethod("fp8")


class ExpertsInt8Config(QuantConfig):
    """Experts in int8, every linear layer unquantized."""
    name = "experts_int8"
    moe_only = True

    def quantized_method(self) -> LinearMethod:
        return UNQUANTIZED

    def moe_method_for(self, prefix: str) -> MoEMethod:
        return EXPERTS_INT8

    def describe(self) -> str:
        return "experts_int8 (MoE expert weights int8 per output channel, quantized at load)"
