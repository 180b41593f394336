"""AWQ checkpoints (AutoAWQ GEMM layout, 4 bit, with zero points).

Tensors per linear layer: ``qweight`` int32 [in, out/8] and ``qzeros`` int32 [in/group, out/8]
(both packed along the output in AWQ's interleaved order, see ``packing.py``) and ``scales``
[in/group, out]. W = (q - z) * s. The GEMV layout (``version: gemv``) and checkpoints without
zero points are refused at start-up. Column-parallel layers split by packed output words,
row-parallel layers by input rows and groups. On CUDA the weight is repacked once after
loading into GPTQ's layout (packed along the input, zeros in natural order: the same W),
which the Triton kernels of ``triton_wna16`` read with 16-byte loads; on CPU the torch
reference runs on the checkpoint's layout (the kernels' oracle).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.quant.base import LinearMethod, QuantConfig, make_param
from pagedllm.quant.gptq import _check_sizes, matmul_dequantized
from pagedllm.quant.kernels import w4mma_apply, w4mma_for, wna16_apply, wna16_for
from pagedllm.quant.packing import awq_dequantize, gptq_dequantize

PACK = 8  # 4-bit values per int32


class AWQConfig(QuantConfig):
    name = "awq"

    def __init__(self, bits: int, group_size: int, zero_point: bool, version: str,
                 skip_rules: list[str] | None = None) -> None:
        super().__init__(skip_rules, substring=True)
        if bits != 4:
            raise ValueError(f"AWQ with bits={bits} is not supported (quantization_config."
                             "bits / w_bit); supported: 4")
        if group_size <= 0:
            raise ValueError(f"AWQ group_size {group_size} is not supported (quantization_config"
                             ".group_size / q_group_size); it must be > 0")
        if not zero_point:
            raise ValueError("AWQ without zero points (quantization_config.zero_point false) "
                             "is not supported; supported: zero_point true")
        if version.lower() != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (quantization_config."
                             "version); supported: gemm")
        self.bits, self.group_size = bits, group_size

    def quantized_method(self) -> LinearMethod:
        return AWQLinearMethod(self.group_size)

    def describe(self) -> str:
        return f"awq 4-bit, group_size {self.group_size}, gemm layout"


class AWQLinearMethod(LinearMethod):
    name = "awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        group, out = self.group_size, sum(output_sizes)
        _check_sizes(layer.prefix, input_size, output_sizes, 1, PACK, group, "AWQ")
        layer.qweight = make_param(torch.empty(input_size, out // PACK, dtype=torch.int32),
                                   input_dim=0, output_dim=1, output_div=PACK)
        layer.qzeros = make_param(torch.empty(input_size // group, out // PACK,
                                              dtype=torch.int32),
                                  input_dim=0, input_div=group, output_dim=1, output_div=PACK)
        layer.scales = make_param(torch.empty(input_size // group, out, dtype=dtype),
                                  input_dim=0, input_div=group, output_dim=1)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Where the Triton kernels serve the layer: repack into GPTQ's layout."""
        module = wna16_for(layer.qweight)
        if module is None:
            return
        qweight, qzeros = module.repack_awq(layer.qweight.data, layer.qzeros.data)
        layer.qweight, layer.qzeros = make_param(qweight), make_param(qzeros)
        layer.awq_repacked = True
        k, n = qweight.shape[0] * PACK, qweight.shape[1]
        mma = w4mma_for(qweight, 4, False, k, n, self.group_size, "AWQ")
        if mma is not None:  # then the tensor-core kernel's layout (triton_w4mma)
            layer.qweight = make_param(mma.repack(qweight))
            layer.w4mma = True

    def _g_idx(self, layer: nn.Module) -> torch.Tensor:
        rows = layer.scales.shape[0] * self.group_size
        return torch.arange(rows, device=layer.scales.device) // self.group_size

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        if getattr(layer, "w4mma", False):
            from pagedllm.quant.triton_w4mma import dequantize_reference
            return dequantize_reference(layer.qweight, layer.qzeros, layer.scales,
                                        self.group_size, 0).to(layer.scales.dtype)
        if getattr(layer, "awq_repacked", False):
            return gptq_dequantize(layer.qweight, layer.qzeros, layer.scales,
                                   self._g_idx(layer), 4, 0)
        return awq_dequantize(layer.qweight, layer.qzeros, layer.scales, self.group_size)

    def _kernel_weight(self, module, layer: nn.Module):
        if getattr(layer, "awq_repacked", False):
            return module.gptq_weight(layer.qweight, layer.qzeros, layer.scales, None, 4,
                                      self.group_size, False, 0)
        return module.awq_weight(layer.qweight, layer.qzeros, layer.scales, self.group_size)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        """Triton kernels on CUDA, else the torch reference."""
        if getattr(layer, "w4mma", False):
            return w4mma_apply(x, (layer.qweight, layer.qzeros, layer.scales),
                               self.group_size, 0, bias, gated_silu)
        out = wna16_apply(layer, x, layer.qweight,
                          lambda module: self._kernel_weight(module, layer), "AWQ", bias,
                          gated_silu)
        if out is not None:
            return out
        return matmul_dequantized(x, self.dequantize(layer), bias, gated_silu)
