"""The KV-cache tensors: the device cache the model reads and the CPU swap space.

Layout per layer: ``spec.shape(num_blocks * block_size)`` — ``[2, slots, num_kv_heads,
head_dim]`` (K then V) for most models, ``[1, slots, 1, latent_dim]`` for multi-head latent
attention (``attention/cache_spec.py``); a token's slot is ``block_id * block_size + offset``.
A rank caches only its pipeline stage's
layers: ``gpu_cache`` maps each of them (by its index in the model) to its tensor, so the
attention layers look their cache up by their own layer index and a stage's blocks cost
only its share of the layers. The device cache starts zeroed (masked
positions of a gather must not hold NaNs); the swap space is allocated on first use, so the
default ``--swap-space`` costs nothing unless swap preemption really happens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pagedllm.attention.cache_spec import KVCacheSpec
from pagedllm.attention.kv_quant import is_fp8


class CacheEngine:
    def __init__(self, layer_ids: Sequence[int], spec: KVCacheSpec, block_size: int,
                 num_gpu_blocks: int, num_cpu_blocks: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.layer_ids = list(layer_ids)  # the layers this rank caches (its pipeline stage's)
        self.spec = spec
        self._dtype = dtype
        self._pin = torch.device(device).type == "cuda"
        # layer index -> spec.shape(num_gpu_blocks * block_size)
        self.gpu_cache: dict[int, torch.Tensor] = {
            i: torch.zeros(spec.shape(num_gpu_blocks * block_size), dtype=dtype, device=device)
            for i in self.layer_ids}
        self._cpu_cache: dict[int, torch.Tensor] | None = None

    @property
    def cpu_cache(self) -> dict[int, torch.Tensor]:
        if self._cpu_cache is None:
            self._cpu_cache = {i: torch.empty(self.spec.shape(self.num_cpu_blocks
                                                              * self.block_size),
                                              dtype=self._dtype, pin_memory=self._pin)
                               for i in self.layer_ids}
        return self._cpu_cache

    def _slot_index(self, block_ids: list[int], device: torch.device) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
        offsets = torch.arange(self.block_size, device=device)
        return (blocks[:, None] * self.block_size + offsets[None, :]).flatten()

    def _copy(self, src: dict[int, torch.Tensor], dst: dict[int, torch.Tensor],
              pairs: list[tuple[int, int]]) -> None:
        if not self.layer_ids:
            return
        first = self.layer_ids[0]
        src_idx = self._slot_index([s for s, _ in pairs], src[first].device)
        dst_idx = self._slot_index([d for _, d in pairs], dst[first].device)
        for i in self.layer_ids:
            s, d = src[i], dst[i]
            if is_fp8(s.dtype):  # CPU index ops lack fp8: copy the bytes
                s, d = s.view(torch.uint8), d.view(torch.uint8)
            d.index_copy_(1, dst_idx, s.index_select(1, src_idx).to(d.device))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (src, dst) device blocks, every cached layer (copy-on-write forks)."""
        self._copy(self.gpu_cache, self.gpu_cache, pairs)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device block, CPU block) pairs to swap space."""
        self._copy(self.gpu_cache, self.cpu_cache, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (CPU block, device block) pairs back to the device cache."""
        self._copy(self.cpu_cache, self.gpu_cache, pairs)
