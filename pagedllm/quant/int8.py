"""int8 W8A8: int8 weights with per-channel or per-tensor scales, int8 activations with a
static per-tensor scale or a dynamic per-token one (compressed-tensors ``int-quantized``,
symmetric, as vLLM 0.6.3 runs it).

Tensors per linear layer: ``weight`` int8 [out, in], ``weight_scale`` [out, 1] (channel) or
one value per checkpoint tensor (tensor; a fused q/k/v layer keeps three) and, for static
activations, ``input_scale`` (one per checkpoint tensor; fused parts take the largest, as one
activation feeds them). Activations: q = round(x / s) clamped to [-128, 127] with the static
scale, or s = max|x_row| / 127 per token (vLLM's ``scaled_int8_quant``); W = q_w * scale.
``apply`` is the torch emulation (int8 codes held in floats, the product in fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.quant.base import LinearMethod, make_param
from pagedllm.quant.gptq import epilogue

INT8_MIN, INT8_MAX = -128, 127


def fake_quantize_int8(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x through int8 and back (fp32): the static ``scale``, or per row max|x| / 127."""
    x = x.float()
    if scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
    return torch.round(x / scale).clamp(INT8_MIN, INT8_MAX) * scale


class Int8LinearMethod(LinearMethod):
    """``per_channel``: weight scales [out, 1], else one per fused part; ``static``: the
    checkpoint's ``input_scale``, else dynamic per-token activation scales."""
    name = "int8-w8a8"

    def __init__(self, per_channel: bool, static: bool) -> None:
        self.per_channel, self.static = per_channel, static

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        out, parts = sum(output_sizes), len(output_sizes)
        layer.part_sizes = list(output_sizes)
        layer.weight = make_param(torch.empty(out, input_size, dtype=torch.int8),
                                  output_dim=0, input_dim=1)
        if self.per_channel:
            layer.weight_scale = make_param(torch.full((out, 1), float("nan")), output_dim=0)
        else:
            layer.weight_scale = make_param(torch.full((parts,), float("nan")), per_shard=True)
        if self.static:
            layer.input_scale = make_param(torch.full((parts,), float("nan")), per_shard=True)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Each output row gets its scale; a scale the checkpoint lacked stays NaN: an error."""
        for scale in ("weight_scale", "input_scale"):
            values = getattr(layer, scale, None)
            if values is not None and (torch.isnan(values).any() or (values <= 0).any()):
                raise ValueError(f"int8 layer {layer.prefix!r}: checkpoint {scale} missing or "
                                 "not positive for a fused part")
        if self.per_channel:
            rows = layer.weight_scale.data[:, 0].float()
        else:
            sizes = torch.tensor(layer.part_sizes, device=layer.weight_scale.device)
            rows = layer.weight_scale.data.float().repeat_interleave(sizes)
        layer.row_scale = make_param(rows.clone())
        if self.static:
            layer.input_scale.data = layer.input_scale.data.max().reshape(1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        scale = layer.input_scale[0].float() if self.static else None
        xq = fake_quantize_int8(x, scale)
        weight = layer.weight.float() * layer.row_scale.unsqueeze(1)          # [out, in]
        out = (xq @ weight.t()).to(x.dtype)
        return epilogue(out, bias, gated_silu)
