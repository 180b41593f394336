"""Linear layers that own their checkpoint ``weight_loader``.

``Linear`` loads a tensor of exactly its shape. ``MergedLinear`` stores several checkpoint
projections side by side along the output dim (q/k/v, gate/up) so one matmul serves them;
its loader places shard ``shard_id`` at its offset. Shape mismatches raise errors naming the
checkpoint tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import lora
from pagedllm.layers import fused


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model "
                         f"expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def new_weight(output_size: int, input_size: int) -> nn.Parameter:
    """An [out, in] weight (Hugging Face's shape). On CPU its memory is laid out [in, out]
    (a transposed view): PyTorch's CPU matmuls with few rows (decode batches) run up to 3x
    faster on that layout, and a rare shape stalls in the [out, in] one."""
    if torch.empty(0).device.type == "cpu":
        return nn.Parameter(torch.empty(input_size, output_size).t())
    return nn.Parameter(torch.empty(output_size, input_size))


class Linear(nn.Module):
    lora = None  # LoRASlots with --enable-lora (pagedllm/lora.py)

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = new_weight(output_size, input_size)  # [out, in]
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None

    def forward(self, x: torch.Tensor, gated_silu: bool = False) -> torch.Tensor:
        """x @ weight^T + bias (+ the rows' LoRA deltas); ``gated_silu`` (a [gate; up]
        projection): silu(gate) * up."""
        batch = lora.current() if self.lora is not None else None
        if batch is None:
            return fused.linear(x, self.weight, self.bias, gated_silu)
        out = self.lora.add_delta(x, fused.linear(x, self.weight, self.bias), batch)
        return fused.silu_and_mul(out) if gated_silu else out


class MergedLinear(Linear):
    """Several projections of the same input, concatenated along the output dim."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes.values()), bias)
        self.output_sizes = output_sizes
        self.offsets: dict[str, int] = {}
        offset = 0
        for shard_id, size in output_sizes.items():
            self.offsets[shard_id] = offset
            offset += size
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "",
                    shard_id: str | None = None) -> None:
        if shard_id is None:  # the checkpoint already has the fused tensor
            return default_weight_loader(param, loaded, name)
        size = self.output_sizes[shard_id]
        target = param.data.narrow(0, self.offsets[shard_id], size)
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {tuple(target.shape)} for shard {shard_id!r}")
        target.copy_(loaded)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(list(self.output_sizes.values()), dim=-1)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias)


class VocabEmbedding(nn.Module):
    """Token embedding; same storage rule as ``Linear`` since a tied LM head multiplies by it."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = new_weight(num_embeddings, embedding_dim)  # [vocab, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
