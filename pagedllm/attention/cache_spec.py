"""What one layer's paged KV cache holds per token: the model decides, the worker allocates.

Most models cache K and V per KV head: ``[2, num_slots, num_kv_heads, head_dim]`` (this
rank's heads). Multi-head latent attention (DeepSeek-V2/V3) caches one compressed latent per
token instead — ``kv_lora_rank + qk_rope_head_dim`` values, shared by every head, replicated
on every tensor-parallel rank: ``[1, num_slots, 1, kv_lora_rank + qk_rope_head_dim]``.

A model class states its own layout through ``kv_cache_spec(model_config, tp_size)`` (a
classmethod); one that does not gets ``default_kv_cache_spec``. The worker sizes blocks and
allocates tensors from the spec alone, so no cache code special-cases an architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_tensors: int  # 2: separate K and V; 1: one latent tensor (MLA)
    num_heads: int  # per token, on this rank
    head_dim: int
    name: str = "kv"  # "kv" or "mla_latent": for logs and error messages

    def shape(self, num_slots: int) -> tuple[int, int, int, int]:
        """One layer's cache tensor shape for ``num_slots`` token slots."""
        return (self.num_tensors, num_slots, self.num_heads, self.head_dim)

    def bytes_per_block(self, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
        return (self.num_tensors * num_layers * block_size * self.num_heads * self.head_dim
                * dtype.itemsize)


def default_kv_cache_spec(model_config, tp_size: int) -> KVCacheSpec:
    """K and V of this rank's KV heads (one when the tensor-parallel size exceeds them: each
    rank then keeps a copy of the head its query heads share)."""
    kv_heads = model_config.num_kv_heads
    return KVCacheSpec(2, kv_heads // tp_size if kv_heads >= tp_size else 1,
                       model_config.head_dim)


def kv_cache_spec_for(model, model_config, tp_size: int) -> KVCacheSpec:
    """The spec ``model`` (an instance or class) declares, else the K/V default."""
    declared = getattr(model, "kv_cache_spec", None)
    if declared is not None:
        return declared(model_config, tp_size)
    return default_kv_cache_spec(model_config, tp_size)


def check_cache_dtype(spec: KVCacheSpec, kv_cache_dtype: str) -> None:
    """An fp8 cache scales K and V per layer; the MLA latent has no such scales yet."""
    if spec.name == "mla_latent" and kv_cache_dtype != "auto":
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is not supported with multi-head "
                         "latent attention (DeepSeek-V2/V3: the cache holds one latent per "
                         "token); supported: auto")
