"""The pool of KV-cache blocks: reference counts, an LRU free queue and the prefix-cache map.

Invariants:
1. A block is in the free queue iff its ``ref_cnt`` is 0.
2. A block with a ``block_hash`` is in ``cached_blocks`` under that hash (first holder wins).
3. Allocation takes blocks from the head of the free queue (least recently freed first) and
   evicts their hash; freeing appends at the tail, so callers free a request's blocks tail
   first to have its tail evicted before its (more shareable) head.
Block ids are handed out 0, 1, 2, ... from a fresh pool.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagedllm.core.block_hash import BlockHash


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, head = next to allocate (LRU), tail = most recently freed.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b)
                                                                 for b in self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}
        self.num_queries = 0  # prefix-cache lookups (blocks), for the hit rate
        self.num_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free queue, head first (the order blocks will be allocated in)."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        self.num_queries += 1
        block = self.cached_blocks.get(block_hash)
        if block is not None:
            self.num_hits += 1
        return block

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > len(self._free):
            raise ValueError(f"cannot get {num_blocks} blocks, only {len(self._free)} free")
        new_blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling idle ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: list[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail in order."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"double free of {block}"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self.cached_blocks.setdefault(block_hash, block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True
