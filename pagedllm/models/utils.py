"""Weight-loading helpers shared by the model files."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedllm.distributed import get_pp_size
from pagedllm.layers.linear import default_weight_loader
from pagedllm.layers.parallel import held_by_other_stage

# (fused parameter name part, checkpoint name part, shard id)
StackedMapping = list[tuple[str, str, str]]


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 stacked: StackedMapping = (), skip: tuple[str, ...] = (),
                 rename=None) -> set[str]:
    """Copy checkpoint tensors into ``model``'s parameters; return the parameter names set.

    ``stacked`` maps separate checkpoint projections (``q_proj``) onto fused parameters
    (``qkv_proj``, shard ``"q"``); ``skip`` lists name fragments to ignore (rotary buffers,
    tied heads); ``rename`` maps a checkpoint name to the model's name first. With several
    pipeline stages, tensors of modules another stage holds are dropped (after renaming).
    """
    other_stages = get_pp_size() > 1
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if rename is not None:
            name = rename(name)
        if name is None or any(part in name for part in skip):
            continue
        if other_stages and held_by_other_stage(model, name):
            continue
        for fused, part, shard_id in stacked:
            if f".{part}." in name:
                target = name.replace(f".{part}.", f".{fused}.")
                if target in params:
                    params[target].weight_loader(params[target], tensor, name, shard_id)
                    loaded.add(target)
                    break
        else:
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in "
                                 f"{type(model).__name__}")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, name)
            else:
                default_weight_loader(param, tensor, name)
            loaded.add(name)
    return loaded


def tie_or_skip(tie: bool) -> tuple[str, ...]:
    """Checkpoint names to skip: the LM head duplicates the embedding when tied."""
    return ("rotary_emb.inv_freq", "lm_head.weight") if tie else ("rotary_emb.inv_freq",)


def fused_qkv_layout(layer: nn.Module, split) -> None:
    """Make every parameter of the fused q/k/v ``layer`` (a ``QKVParallelLinear``) load a
    checkpoint tensor whose output rows are in a model's own order (per-head interleaved,
    grouped per KV head, ...). ``split(rows, features_per_row)`` takes the tensor with its
    output features along dim 0 and returns its q, k and v parts in the plain order (q heads,
    k heads, v heads); each is then cut to this rank by the layer's own shard loader. The
    parameter's ``output_dim`` / ``output_div`` say where the output features are, so packed
    (AWQ) and transposed (GPTQ) quantized tensors load too; a tensor without output features
    (GPTQ ``g_idx``, a per-tensor scale) is the same for every part."""
    for param in layer.parameters(recurse=False):
        inner = param.weight_loader

        def load(param, loaded: torch.Tensor, name: str = "", shard_id=None,
                 inner=inner) -> None:
            dim = getattr(param, "output_dim", None)
            if dim is None or getattr(param, "same_per_shard", False) or loaded.dim() <= dim:
                parts = (loaded, loaded, loaded)
            else:
                rows = loaded.movedim(dim, 0)
                parts = tuple(p.movedim(0, dim)
                              for p in split(rows, getattr(param, "output_div", 1)))
            for part, shard in zip(parts, ("q", "k", "v")):
                inner(param, part, name, shard)

        param.weight_loader = load


def grouped_qkv_splitter(num_heads: int, num_kv_heads: int, head_dim: int):
    """``split`` for ``fused_qkv_layout`` of rows grouped per KV head, ``[kv head][its q heads
    | k | v][head_dim]`` (Falcon's new decoder architecture, InternLM2's ``wqkv``)."""
    group = num_heads // num_kv_heads

    def split(rows: torch.Tensor, div: int):
        rest, per_head = tuple(rows.shape[1:]), head_dim // div
        grouped = rows.reshape(num_kv_heads, group + 2, per_head, *rest)
        return (grouped[:, :group].reshape(num_heads * per_head, *rest),
                grouped[:, group].reshape(num_kv_heads * per_head, *rest),
                grouped[:, group + 1].reshape(num_kv_heads * per_head, *rest))

    return split
