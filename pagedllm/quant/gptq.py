"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout), 2, 4 and 8 bit.

Tensors per linear layer: ``qweight`` int32 [in/pack, out] (packed along the input),
``qzeros`` int32 [groups, out/pack] (packed along the output), ``scales`` [groups, out] and
``g_idx`` int32 [in] (each input's group; arbitrary with ``desc_act``, else i // group_size).
``group_size`` -1 is one group per column. The ``gptq`` checkpoint format stores zero points
minus one; ``gptq_v2`` stores them as they are. On CUDA, 4- and 8-bit layers run the Triton
kernels of ``triton_wna16`` (dequantization fused, act-order ``g_idx`` gathered per row);
2-bit layers and CPU run the torch reference (dequantize to the activation dtype, then
multiply), which is also the kernels' oracle.

Tensor parallelism: column-parallel layers split qweight/scales by output column and qzeros
by packed output words; row-parallel layers split qweight by packed input rows and
scales/qzeros by group, except with ``desc_act`` where g_idx is split and the scales stay whole
(the rank's inputs may come from any group).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from pagedllm.layers import fused
from pagedllm.quant.base import LinearMethod, QuantConfig, make_param
from pagedllm.quant.kernels import log_once, w4mma_apply, w4mma_for, wna16_apply
from pagedllm.quant.packing import gptq_dequantize

logger = logging.getLogger(__name__)


class GPTQConfig(QuantConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool,
                 zero_offset: int = 1, skip_rules: list[str] | None = None) -> None:
        super().__init__(skip_rules, substring=True)
        if bits not in (2, 4, 8):
            raise ValueError(f"GPTQ with bits={bits} is not supported (quantization_config.bits"
                             "); supported: 2, 4, 8")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"GPTQ group_size {group_size} is invalid (quantization_config."
                             "group_size); it must be -1 or > 0")
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.zero_offset = zero_offset

    def quantized_method(self) -> LinearMethod:
        return GPTQLinearMethod(self)

    def describe(self) -> str:
        return (f"gptq {self.bits}-bit, group_size {self.group_size}, desc_act "
                f"{self.desc_act}, sym {self.sym}")


def _check_sizes(prefix: str, input_size: int, output_sizes: list[int], input_pack: int,
                 pack: int, group: int | None, what: str) -> None:
    """Every packed word and group must lie inside one rank's, one fused part's features."""
    if input_size % input_pack:
        raise ValueError(f"{what} layer {prefix!r}: input size {input_size} does not divide by "
                         f"the pack factor {input_pack} (this rank's share, "
                         "--tensor-parallel-size)")
    if group is not None and input_size % group:
        raise ValueError(f"{what} layer {prefix!r}: input size {input_size} does not divide "
                         f"by group_size {group} (this rank's share, --tensor-parallel-size)")
    for size in output_sizes:
        if size % pack:
            raise ValueError(f"{what} layer {prefix!r}: output part of size {size} does not "
                             f"divide by the pack factor {pack} (--tensor-parallel-size)")


class GPTQLinearMethod(LinearMethod):
    name = "gptq"

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        cfg, out = self.config, sum(output_sizes)
        pack = 32 // cfg.bits
        split_input = getattr(layer, "input_shards", 1) > 1
        whole_scales = cfg.group_size == -1 or (cfg.desc_act and split_input)
        group = cfg.group_size if cfg.group_size != -1 else input_size
        _check_sizes(layer.prefix, input_size, output_sizes, pack, pack,
                     None if whole_scales else group, "GPTQ")
        full_in = input_size * getattr(layer, "input_shards", 1)
        groups = 1 if cfg.group_size == -1 else (full_in if whole_scales else input_size) // group
        scale_in = dict(input_dim=None) if whole_scales else dict(input_dim=0, input_div=group)
        layer.qweight = make_param(torch.empty(input_size // pack, out, dtype=torch.int32),
                                   input_dim=0, input_div=pack, output_dim=1)
        layer.qzeros = make_param(torch.empty(groups, out // pack, dtype=torch.int32),
                                  output_dim=1, output_div=pack, **scale_in)
        layer.scales = make_param(torch.empty(groups, out, dtype=dtype), output_dim=1,
                                  **scale_in)
        layer.g_idx = make_param(self._default_g_idx(input_size), input_dim=0,
                                 same_per_shard=True, optional=not cfg.desc_act)

    def _default_g_idx(self, input_size: int) -> torch.Tensor:
        if self.config.group_size == -1:
            return torch.zeros(input_size, dtype=torch.int32)
        return torch.arange(input_size, dtype=torch.int32) // self.config.group_size

    def process_after_loading(self, layer: nn.Module) -> None:
        """Without ``desc_act`` the groups are static: the checkpoint's g_idx (global ids on a
        row-parallel rank whose scales are local) is replaced by the local one."""
        if not self.config.desc_act:
            layer.g_idx.data = self._default_g_idx(layer.g_idx.numel()).to(layer.g_idx.device)
        elif int(layer.g_idx.max()) >= layer.scales.shape[0] or int(layer.g_idx.min()) < 0:
            raise ValueError(f"GPTQ layer {layer.prefix!r}: g_idx refers to group "
                             f"{int(layer.g_idx.max())}, the checkpoint has "
                             f"{layer.scales.shape[0]} groups of scales")
        cfg = self.config
        k, n = layer.qweight.shape[0] * (32 // cfg.bits), layer.qweight.shape[1]
        module = w4mma_for(layer.qweight, cfg.bits, cfg.desc_act, k, n, cfg.group_size,
                           "GPTQ")
        if module is not None:  # the tensor-core kernel's layout (triton_w4mma)
            layer.qweight = make_param(module.repack(layer.qweight.data))
            layer.w4mma = True

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        cfg = self.config
        if getattr(layer, "w4mma", False):
            from pagedllm.quant.triton_w4mma import dequantize_reference
            return dequantize_reference(layer.qweight, layer.qzeros, layer.scales,
                                        cfg.group_size, cfg.zero_offset).to(layer.scales.dtype)
        return gptq_dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                               cfg.bits, cfg.zero_offset)

    def _kernel_weight(self, module, layer: nn.Module):
        cfg = self.config
        return module.gptq_weight(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                                  cfg.bits, cfg.group_size, cfg.desc_act, cfg.zero_offset)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        """Triton kernels on CUDA (4 and 8 bit), else the torch reference."""
        if getattr(layer, "w4mma", False):
            return w4mma_apply(x, (layer.qweight, layer.qzeros, layer.scales),
                               self.config.group_size, self.config.zero_offset, bias,
                               gated_silu)
        if self.config.bits in (4, 8):
            out = wna16_apply(layer, x, layer.qweight,
                              lambda module: self._kernel_weight(module, layer), "GPTQ",
                              bias, gated_silu)
            if out is not None:
                return out
        elif x.is_cuda:
            log_once(f"GPTQ {self.config.bits}-bit: no Triton kernel, the torch "
                     "dequantize-then-matmul reference runs")
        return matmul_dequantized(x, self.dequantize(layer), bias, gated_silu)


def epilogue(out: torch.Tensor, bias: torch.Tensor | None, gated_silu: bool) -> torch.Tensor:
    """+ bias, then the gated SiLU if asked."""
    if bias is not None:
        out = out + bias
    return fused.silu_and_mul(out) if gated_silu else out


def matmul_dequantized(x: torch.Tensor, weight_in_out: torch.Tensor,
                       bias: torch.Tensor | None, gated_silu: bool) -> torch.Tensor:
    """x @ W (+ bias) for a dequantized [in, out] weight, then the gated SiLU if asked."""
    return epilogue(torch.matmul(x, weight_in_out.to(x.dtype)), bias, gated_silu)
