"""The dense methods: today's weight layout and kernel choice, unchanged (linear layers and
the stacked experts of ``FusedMoE``).

On CPU the [out, in] weight is stored as a transposed view of an [in, out] buffer, and
``fused.linear`` picks the Triton GEMV for tuned one-row CUDA shapes, else cuBLAS/PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers import fused
from pagedllm.quant.base import LinearMethod, MoEMethod


def new_weight(output_size: int, input_size: int) -> nn.Parameter:
    """An [out, in] weight (Hugging Face's shape). On CPU its memory is laid out [in, out]
    (a transposed view): PyTorch's CPU matmuls with few rows (decode batches) run up to 3x
    faster on that layout, and a rare shape stalls in the [out, in] one."""
    if torch.empty(0).device.type == "cpu":
        return nn.Parameter(torch.empty(input_size, output_size).t())
    return nn.Parameter(torch.empty(output_size, input_size))


def tag_dense(param: nn.Parameter) -> nn.Parameter:
    """Sharding metadata of a dense [out, in] weight (see ``quant/base.py``)."""
    param.output_dim, param.input_dim, param.output_div, param.input_div = 0, 1, 1, 1
    param.per_shard = param.same_per_shard = param.optional = False
    return param


class UnquantizedLinearMethod(LinearMethod):
    name = "unquantized"

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       dtype: torch.dtype) -> None:
        layer.weight = tag_dense(new_weight(sum(output_sizes), input_size))  # [out, in]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              gated_silu: bool = False) -> torch.Tensor:
        return fused.linear(x, layer.weight, bias, gated_silu)


UNQUANTIZED = UnquantizedLinearMethod()


def stored_rows(target: torch.Tensor, expert: int | None, row_offset: int, rows: int,
                row_dim: int = -2) -> torch.Tensor:
    """The view of a stacked ``[E, rows, ...]`` tensor that ``MoEMethod.store`` writes."""
    if expert is not None:
        target = target[expert]
    return target.narrow(row_dim, row_offset, rows)


class UnquantizedMoEMethod(MoEMethod):
    name = "unquantized"

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size: int, dtype: torch.dtype) -> None:
        layer.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size,
                                                      hidden_size, dtype=dtype))
        layer.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                                   dtype=dtype))

    def store(self, layer: nn.Module, name: str, expert: int | None, row_offset: int,
              value: torch.Tensor) -> None:
        stored_rows(getattr(layer, name).data, expert, row_offset, value.shape[-2]).copy_(value)

    def expert_weights(self, layer: nn.Module):
        return layer.gate_up_proj, layer.down_proj


UNQUANTIZED_MOE = UnquantizedMoEMethod()
