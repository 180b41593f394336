"""Oracles of what each rank holds, counted from the checkpoint itself, and the rank
functions that report it (module-level, so ``collective_rpc`` can send them to the workers).

Rank layout: global rank = ``pp_rank * tp + tp_rank`` (``pagedllm.distributed``); stage ``s``
holds the contiguous layers of ``pagedllm.distributed.stage_layers`` (earlier stages take
the remainder).
"""
from __future__ import annotations

import os
import re

# tensors every tensor-parallel rank keeps whole: norms, position embeddings, the plain
# (unsharded) OPT projections and the biases of row-parallel layers (added after the
# all-reduce)
REPLICATED = ("norm", "ln_", "layer_norm", "wpe", "embed_positions", "project_in",
              "project_out", "o_proj.bias", "out_proj.bias", "fc2.bias", "down_proj.bias",
              "c_proj.bias")
EMBEDDINGS = ("embed_tokens", "wte")  # also the LM head when it is tied
FIRST_STAGE_ONLY = ("embed_positions", "wpe", "project_in")
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def stage_of_layer(layer: int, num_layers: int, pp: int) -> int:
    per, extra = divmod(num_layers, pp)
    bounds = [s * per + min(s, extra) for s in range(pp + 1)]
    return next(s for s in range(pp) if bounds[s] <= layer < bounds[s + 1])


def checkpoint(path) -> dict:
    """The checkpoint's tensors (GPT-2's causal-mask buffers, which no rank loads, left out)."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"))
    return {n: t for n, t in state.items() if not n.endswith((".attn.bias", "masked_bias"))}


def expected_numels(path, tp: int, pp: int) -> list[int]:
    """Parameter elements per global rank: its stage's checkpoint tensors, ``REPLICATED``
    ones whole, every other 1/tp. The first stage holds the embeddings, the last the final
    norm and LM head; a tied LM head makes the last stage keep its own embedding copy."""
    state = checkpoint(path)
    tied = "lm_head.weight" not in state
    num_layers = 1 + max(int(m.group(1)) for m in map(_LAYER.search, state) if m)
    per_stage = [0] * pp
    for name, t in state.items():
        layer = _LAYER.search(name)
        if layer:
            stages = [stage_of_layer(int(layer.group(1)), num_layers, pp)]
        elif any(k in name for k in FIRST_STAGE_ONLY):
            stages = [0]
        elif any(k in name for k in EMBEDDINGS):
            stages = sorted({0, pp - 1}) if tied else [0]
        else:  # final norm, LM head
            stages = [pp - 1]
        numel = t.numel() if any(k in name for k in REPLICATED) else t.numel() // tp
        for s in stages:
            per_stage[s] += numel
    return [per_stage[r // tp] for r in range(tp * pp)]


def kv_cache_layout(worker) -> tuple[list[int], int, int, tuple]:
    """(layers cached, bytes of the whole KV cache, bytes of one block, shape of a layer's
    cache) of one rank."""
    cache = worker.runner.cache.gpu_cache
    total = sum(t.numel() * t.element_size() for t in cache.values())
    return sorted(cache), total, worker.block_bytes, tuple(next(iter(cache.values())).shape)
