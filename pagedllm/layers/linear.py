"""Linear layers that own their checkpoint ``weight_loader``.

``Linear`` loads a tensor of exactly its shape. ``MergedLinear`` stores several checkpoint
projections side by side along the output dim (q/k/v, gate/up) so one matmul serves them;
its loader places shard ``shard_id`` at its offset. Shape mismatches raise errors naming the
checkpoint tensor.

What a layer stores and how it multiplies is its ``quant_method`` (``pagedllm/quant``), chosen
once at construction from ``quant_config`` and the module's checkpoint name ``prefix``
(without a config: the dense method, today's path). The loaders cut checkpoint tensors by the
metadata each parameter carries (``quant/base.py``), so packed int4 words and group scales
shard and fuse along the right dims.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers import fused
from pagedllm.quant.base import get_linear_method, narrow_features
from pagedllm.quant.unquantized import new_weight  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from pagedllm.worker.lora import LoRABatch


class NoLoRAGiven:
    """``Linear.forward``'s ``lora`` when the caller passed none: fine for a projection
    without LoRA slots; one with slots raises rather than lose its deltas."""

    def __repr__(self) -> str:
        return "NO_LORA_GIVEN"


NO_LORA_GIVEN = NoLoRAGiven()


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model "
                         f"expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def _tag_bias(bias: nn.Parameter) -> nn.Parameter:
    bias.output_dim, bias.input_dim, bias.output_div, bias.input_div = 0, None, 1, 1
    bias.per_shard = bias.same_per_shard = bias.optional = False
    return bias


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    """A tensor loaded whole; a per-part scalar given once (fused checkpoint) fills every part."""
    if getattr(param, "per_shard", False) and loaded.numel() == 1:
        param.data.fill_(loaded.reshape(()).item())
        return
    if loaded.dim() == 0 and param.dim() == 1 and param.numel() == 1:
        loaded = loaded.reshape(1)
    default_weight_loader(param, loaded, name)


class Linear(nn.Module):
    lora = None  # LoRASlots with --enable-lora (pagedllm/worker/lora.py)
    output_sizes: dict[str, int] | None = None  # fused parts (MergedLinear)

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *,
                 quant_config=None, prefix: str = "") -> None:
        """``quant_config`` (a ``pagedllm.quant`` config) and ``prefix`` (the checkpoint name
        of this module, e.g. ``model.layers.0.mlp.down_proj``) pick the quant method."""
        super().__init__()
        self.input_size, self.output_size, self.prefix = input_size, output_size, prefix
        self.quant_method = get_linear_method(quant_config, prefix)
        parts = list(self.output_sizes.values()) if self.output_sizes else [output_size]
        self.quant_method.create_weights(self, input_size, parts, torch.get_default_dtype())
        self.bias = _tag_bias(nn.Parameter(torch.empty(output_size))) if bias else None
        for param in self.parameters(recurse=False):
            param.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "",
              shard_id: str | None = None) -> None:
        if getattr(param, "discard", False):
            return
        _copy_whole(param, self._rank_slice(param, loaded, name), name)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor (all of it without parallelism)."""
        return loaded

    def forward(self, x: torch.Tensor, gated_silu: bool = False,
                lora: LoRABatch | None | NoLoRAGiven = NO_LORA_GIVEN) -> torch.Tensor:
        """x @ weight^T + bias (+ the rows' LoRA deltas); ``gated_silu`` (a [gate; up]
        projection): silu(gate) * up. ``lora``: the forward's ``ForwardContext.lora``,
        which a LoRA-capable projection's caller must pass (None: no adapter rows)."""
        if self.lora is None or lora is None:
            return self.quant_method.apply(self, x, self.bias, gated_silu)
        if isinstance(lora, NoLoRAGiven):
            raise RuntimeError(f"{self.prefix or type(self).__name__} holds LoRA slots but its "
                               "caller passed no LoRA batch (ForwardContext.lora)")
        out = self.lora.add_delta(x, self.quant_method.apply(self, x, self.bias), lora)
        return fused.silu_and_mul(out) if gated_silu else out


class MergedLinear(Linear):
    """Several projections of the same input, concatenated along the output dim."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool = False, *,
                 quant_config=None, prefix: str = "") -> None:
        self.output_sizes = dict(output_sizes)
        self.offsets: dict[str, int] = {}
        offset = 0
        for shard_id, size in output_sizes.items():
            self.offsets[shard_id] = offset
            offset += size
        self.loaded_once: dict[int, str] = {}  # same_per_shard params: the first part's name
        self.parts_loaded: dict[int, set[str]] = {}  # id(param) -> shard ids loaded
        super().__init__(input_size, sum(output_sizes.values()), bias,
                         quant_config=quant_config, prefix=prefix)

    def _part_range(self, shard_id: str) -> tuple[int, int, int]:
        """(full size of part ``shard_id`` in the checkpoint, start and size of this rank's
        features in it)."""
        size = self.output_sizes[shard_id]
        return size, 0, size

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "",
              shard_id: str | None = None) -> None:
        self.parts_loaded.setdefault(id(param), set()).update(
            self.output_sizes if shard_id is None else (shard_id,))
        if getattr(param, "discard", False):
            return None
        if shard_id is None:  # the checkpoint already has the fused tensor
            return self._load_fused(param, loaded, name)
        if getattr(param, "per_shard", False):
            if loaded.numel() != 1:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, "
                                 "the model expects one per-tensor value")
            param.data[list(self.output_sizes).index(shard_id)] = loaded.reshape(()).item()
            return None
        if getattr(param, "same_per_shard", False):
            return self._load_same(param, self._rank_slice(param, loaded, name), name)
        self._load_part(param, loaded, name, shard_id)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, name: str,
                   shard_id: str) -> None:
        dim, div = param.output_dim, param.output_div
        full, start, size = self._part_range(shard_id)
        if dim is None or loaded.dim() <= dim or loaded.shape[dim] * div != full:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {full} output features (along dim {dim}, {div} "
                             f"per element) for shard {shard_id!r}")
        # fused layers are column-parallel: only the output dim is split
        source = narrow_features(loaded, dim, div, start, size, name)
        target = narrow_features(param.data, dim, div, self.offsets[shard_id],
                                 self.output_sizes[shard_id], name)
        if target.shape != source.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {tuple(target.shape)} for shard {shard_id!r}")
        target.copy_(source)

    def _load_same(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        """A tensor each fused part repeats (GPTQ ``g_idx``): the parts must agree."""
        first = self.loaded_once.get(id(param))
        if first is not None and not torch.equal(param.data,
                                                 loaded.to(param.device, param.dtype)):
            raise ValueError(f"checkpoint tensor {name!r} differs from {first!r}; pagedllm fuses "
                             "these projections into one layer, which needs them equal")
        default_weight_loader(param, loaded, name)
        self.loaded_once[id(param)] = name

    def _load_fused(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        """A fused checkpoint tensor (Phi-3 ``qkv_proj``): each part cut to this rank."""
        dim, div = getattr(param, "output_dim", None), getattr(param, "output_div", 1)
        if dim is None or getattr(param, "same_per_shard", False):
            return _copy_whole(param, self._rank_slice(param, loaded, name), name)
        fulls = [self._part_range(k)[0] for k in self.output_sizes]
        if loaded.dim() <= dim or loaded.shape[dim] * div != sum(fulls):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the "
                             f"model expects {sum(fulls)} rows")
        parts = []
        for shard_id, piece in zip(self.output_sizes,
                                   loaded.split([f // div for f in fulls], dim=dim)):
            _, start, size = self._part_range(shard_id)
            parts.append(narrow_features(piece, dim, div, start, size, name))
        _copy_whole(param, torch.cat(parts, dim=dim), name)

    def missing_parts(self) -> list[str]:
        """``<param> (part <shard>)`` for each fused part of a required parameter that no
        checkpoint tensor filled (a fused layer counts as loaded once any part is)."""
        missing = []
        for pname, param in self._parameters.items():
            if param is None or getattr(param, "optional", False):
                continue
            seen = self.parts_loaded.get(id(param), set())
            missing += [f"{self.prefix or type(self).__name__}.{pname} (part {k!r})"
                        for k in self.output_sizes if k not in seen]
        return missing

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(list(self.output_sizes.values()), dim=-1)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, *, quant_config=None, prefix: str = "") -> None:
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias,
                         quant_config=quant_config, prefix=prefix)


class VocabEmbedding(nn.Module):
    """Token embedding; same storage rule as ``Linear`` since a tied LM head multiplies by it."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = new_weight(num_embeddings, embedding_dim)  # [vocab, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
