"""Tensor-parallel variants of the layers in ``linear.py``.

Each rank holds only its slice: the ``weight_loader``s receive the full checkpoint tensor and
copy just this rank's rows (column-parallel, output dim) or columns (row-parallel, input dim),
so no rank keeps the full weight. At tensor-parallel size 1 every class is shape- and
result-identical to its ``linear.py`` parent.

- ``ColumnParallelLinear``: output dim split; no communication (the next row-parallel layer
  consumes the split activations).
- ``MergedColumnParallelLinear``: gate/up (or any fused projections): each part split.
- ``QKVParallelLinear``: q heads split; KV heads split too, or replicated (each rank holds
  one KV head) when the tensor-parallel size exceeds them.
- ``RowParallelLinear``: input dim split; partial outputs summed with an all-reduce, the bias
  added once after it.
- ``VocabParallelEmbedding`` / ``ParallelLMHead``: vocabulary rows split (padded to a
  multiple of the size); the embedding zeroes rows outside the rank's range and all-reduces;
  ``compute_logits`` all-gathers the logits and trims the padding (``org_vocab_size``).

Quantized layers cut their packed weights, group scales and zeros the same way: each
parameter names its output / input dim and the features one element covers (pack factor,
group size), see ``pagedllm/quant/base.py``; a split that falls inside a packed word or a
group is an error naming the tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed import all_reduce, get_tp_rank, get_tp_size, stage_layers
from pagedllm.layers.linear import (NO_LORA_GIVEN, Linear, MergedLinear, VocabEmbedding,
                                    NoLoRAGiven, default_weight_loader)
from pagedllm.quant.base import narrow_features

if TYPE_CHECKING:
    from pagedllm.worker.lora import LoRABatch


def _divide(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"{what} ({size}) does not divide by --tensor-parallel-size {tp}")
    return size // tp


def _rank_features(param: nn.Parameter, loaded: torch.Tensor, name: str, which: str,
                   per_rank: int) -> torch.Tensor:
    """This rank's ``per_rank`` features of ``loaded`` along the param's ``which`` ("output" /
    "input") dim, in elements of the param's pack factor or group size there; a tensor
    without that dim (a replicated scale, a row-parallel bias) is returned whole."""
    dim, div = getattr(param, f"{which}_dim", None), getattr(param, f"{which}_div", 1)
    if dim is None:
        return loaded
    full = per_rank * get_tp_size()
    if loaded.dim() <= dim or loaded.shape[dim] * div != full:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                         f"model expects {full} {which} features along dim {dim} ({div} per "
                         "element)")
    return narrow_features(loaded, dim, div, get_tp_rank() * per_rank, per_rank, name)


class ColumnParallelLinear(Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 quant_config=None, prefix: str = "") -> None:
        super().__init__(input_size, _divide(output_size, get_tp_size(), "output size"), bias,
                         quant_config=quant_config, prefix=prefix)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        return _rank_features(param, loaded, name, "output", self.output_size)


class RowParallelLinear(Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 quant_config=None, prefix: str = "") -> None:
        self.input_shards = get_tp_size()  # read by quant methods (group scales of the input)
        super().__init__(_divide(input_size, get_tp_size(), "input size"), output_size, bias,
                         quant_config=quant_config, prefix=prefix)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        # the bias has no input dim: replicated, added once after the all-reduce
        return _rank_features(param, loaded, name, "input", self.input_size)

    def forward(self, x: torch.Tensor, gated_silu: bool = False,
                lora: LoRABatch | None | NoLoRAGiven = NO_LORA_GIVEN) -> torch.Tensor:
        if get_tp_size() == 1:
            return super().forward(x, gated_silu, lora)
        if self.lora is not None or gated_silu:
            raise RuntimeError("a row-parallel projection runs LoRA and gated SiLU at "
                               "tensor-parallel size 1 only")
        out = all_reduce(self.quant_method.apply(self, x, None))
        return out + self.bias if self.bias is not None else out


class MergedColumnParallelLinear(MergedLinear):
    """``MergedLinear`` whose every part (gate, up, ...) is split along the output dim."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False, *,
                 quant_config=None, prefix: str = "") -> None:
        tp = get_tp_size()
        self.full_sizes = dict(output_sizes)
        super().__init__(input_size, {k: _divide(v, tp, f"{k} size")
                                      for k, v in output_sizes.items()}, bias,
                         quant_config=quant_config, prefix=prefix)

    def _part_range(self, shard_id: str) -> tuple[int, int, int]:
        size = self.output_sizes[shard_id]
        return self.full_sizes[shard_id], get_tp_rank() * size, size

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        return loaded  # only per-part tensors are split (``_part_range``); g_idx is whole


class QKVParallelLinear(MergedColumnParallelLinear):
    """q heads split over the ranks; KV heads split, or replicated when tp exceeds them.

    ``num_heads`` / ``num_kv_heads`` are this rank's head counts."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, *, quant_config=None, prefix: str = "") -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "number of KV heads")
            self.kv_start = rank * self.num_kv_heads
        else:  # replicate: ranks r*k .. r*k+k-1 share KV head r (k = tp / num_kv_heads)
            _divide(tp, num_kv_heads, "--tensor-parallel-size over the KV heads")
            self.num_kv_heads = 1
            self.kv_start = rank // (tp // num_kv_heads)
        self.q_start = rank * self.num_heads
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                           "v": num_kv_heads * head_dim}
        MergedLinear.__init__(self, hidden_size, {"q": self.num_heads * head_dim,
                                                  "k": self.num_kv_heads * head_dim,
                                                  "v": self.num_kv_heads * head_dim}, bias,
                              quant_config=quant_config, prefix=prefix)

    def _part_range(self, shard_id: str) -> tuple[int, int, int]:
        heads, start = ((self.num_heads, self.q_start) if shard_id == "q"
                        else (self.num_kv_heads, self.kv_start))
        return self.full_sizes[shard_id], start * self.head_dim, heads * self.head_dim


class VocabParallelEmbedding(VocabEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        tp = get_tp_size()
        self.org_vocab_size = num_embeddings
        self.per_rank = -(-num_embeddings // tp)
        self.vocab_start = get_tp_rank() * self.per_rank
        super().__init__(self.per_rank, embedding_dim)
        self.weight.weight_loader = self._load
        self.weight.org_vocab_size = num_embeddings  # read by compute_logits

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if loaded.shape[0] != self.org_vocab_size:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {self.org_vocab_size} rows")
        end = min(self.vocab_start + self.per_rank, self.org_vocab_size)
        rows = max(end - self.vocab_start, 0)
        param.data.zero_()
        if rows:
            default_weight_loader(param.data.narrow(0, 0, rows),
                                  loaded.narrow(0, self.vocab_start, rows), name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """The (untied) LM head: vocabulary rows split like ``VocabParallelEmbedding``."""


class PPMissingLayer(nn.Module):
    """Stands in (no parameters) for a layer that another pipeline stage holds, so module
    names and layer indices stay those of the checkpoint."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def stage_layer_list(num_layers: int, build) -> tuple[range, nn.ModuleList]:
    """This pipeline stage's layer indices and a list of every layer: ``build(i)`` for the
    stage's own, ``PPMissingLayer`` for the others (all of them built at one stage)."""
    own = stage_layers(num_layers)
    return own, nn.ModuleList(build(i) if i in own else PPMissingLayer()
                              for i in range(num_layers))


def held_by_other_stage(model: nn.Module, name: str) -> bool:
    """Whether checkpoint tensor ``name`` (the model's name for it) belongs to a module that
    another pipeline stage holds: one of its parent modules is a ``PPMissingLayer`` or set to
    ``None`` (the embedding off the first stage, the final norm / LM head off the last). A
    name with no such parent is this stage's, so an unknown name still raises."""
    module = model
    for part in name.split(".")[:-1]:
        if isinstance(module, nn.ModuleList) and part.isdigit() and int(part) < len(module):
            module = module[int(part)]
        elif hasattr(module, part):
            module = getattr(module, part)
        else:
            return False
        if module is None or isinstance(module, PPMissingLayer):
            return True
    return False
