"""Maps requests to KV-cache blocks: prefix-cache lookup, slot allocation, freeing and swap.

The scheduler asks; this module answers with blocks or ``None`` (no room) and never decides
policy. All state is Python bookkeeping: the tensors live in the worker, which learns block
ids (and swap copies) through ``SchedulerOutput``.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pagedllm.core.adapters import block_hash_salt
from pagedllm.core.block_hash import BlockHash, hash_request_blocks
from pagedllm.core.block_pool import BlockPool, KVCacheBlock
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int,
                 enable_caching: bool, num_lookahead_slots: int = 0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.num_lookahead_slots = num_lookahead_slots
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.num_cpu_blocks = num_cpu_blocks
        self._cpu_free: deque[int] = deque(range(num_cpu_blocks))
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_cpu_blocks: dict[str, list[int]] = {}
        self._req_to_hashes: dict[str, list[BlockHash]] = {}
        self._num_cached_blocks: dict[str, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def cpu_usage(self) -> float:
        if self.num_cpu_blocks == 0:
            return 0.0
        return 1.0 - len(self._cpu_free) / self.num_cpu_blocks

    def prefix_cache_hit_rate(self) -> float:
        return self.pool.num_hits / self.pool.num_queries if self.pool.num_queries else 0.0

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, ())]

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        known = self._req_to_hashes.get(request.req_id, [])
        if len(known) < request.num_tokens // self.block_size:
            # another soft prompt or LoRA: other KV for the same ids
            known = hash_request_blocks(request.all_token_ids, self.block_size, known,
                                        block_hash_salt(request.prompt_adapter_request,
                                                        request.lora_request))
            self._req_to_hashes[request.req_id] = known
        return known

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        The last token is always recomputed (its logits are needed), so a hit covers at most
        ``num_tokens - 1`` tokens. Requests asking for ``prompt_logprobs`` get no hit: they
        need logits at every prompt position, so their prompt is recomputed.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in self._block_hashes(request)[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    # ---- allocation ----------------------------------------------------------------------
    def num_new_blocks(self, request: Request, num_new_tokens: int,
                       num_hit_blocks: int = 0) -> int:
        """Blocks ``allocate_slots`` would take for ``num_new_tokens`` more tokens (after
        ``num_hit_blocks`` prefix-cache hits); <= 0 when the request's blocks cover them."""
        num_total = request.num_computed_tokens + num_hit_blocks * self.block_size + \
            num_new_tokens + self.num_lookahead_slots
        return cdiv(num_total, self.block_size) - \
            len(self.req_to_blocks.get(request.req_id, ())) - num_hit_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       ) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens (plus lookahead slots).

        ``new_computed_blocks`` are prefix-cache hits found for a waiting request; they are
        taken (ref counted) only if the whole allocation succeeds. Returns the newly
        allocated blocks, or ``None`` when there are not enough free blocks.
        """
        blocks = self.req_to_blocks.setdefault(request.req_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = self.num_new_blocks(request, num_new_tokens, len(new_computed_blocks))
        num_idle_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_idle_hits:
            return None
        self.pool.touch(list(new_computed_blocks))
        blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that will be full of known tokens once this step has run."""
        if not self.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        blocks = self.req_to_blocks[request.req_id]
        for i in range(start, num_full):
            self.pool.cache_full_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.req_id] = num_full

    def free(self, request: Request) -> None:
        """Give back every block of the request, tail first (tail blocks are evicted first)."""
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.pool.free_blocks(list(reversed(blocks)))
        self._num_cached_blocks.pop(request.req_id, None)
        self._cpu_free.extend(self.req_to_cpu_blocks.pop(request.req_id, []))
        if request.is_finished():
            self._req_to_hashes.pop(request.req_id, None)

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Give ``child`` the parent's prompt KV, copy-on-write: every block before the one
        holding the last prompt token is shared (ref count + 1); that block is copied into a
        new block of the child's. Returns the (src, dst) copy, or None with no free block."""
        if self.pool.num_free_blocks < 1:
            return None
        num_shared = (parent.num_prompt_tokens - 1) // self.block_size
        parent_blocks = self.req_to_blocks[parent.req_id]
        shared = parent_blocks[:num_shared]
        self.pool.touch(shared)
        new_block = self.pool.get_new_blocks(1)[0]
        self.req_to_blocks[child.req_id] = shared + [new_block]
        if self.enable_caching:
            self._num_cached_blocks[child.req_id] = num_shared
        return parent_blocks[num_shared].block_id, new_block.block_id

    # ---- swap ----------------------------------------------------------------------------
    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to CPU swap space; returns (gpu, cpu) copies or None."""
        blocks = self.req_to_blocks.get(request.req_id, [])
        if len(blocks) > len(self._cpu_free):
            return None
        cpu_ids = [self._cpu_free.popleft() for _ in blocks]
        mapping = [(b.block_id, c) for b, c in zip(blocks, cpu_ids)]
        self.free(request)
        self.req_to_cpu_blocks[request.req_id] = cpu_ids
        return mapping

    def swap_in(self, request: Request, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Bring a swapped request back with room for ``num_new_tokens`` more tokens.

        Returns (cpu, gpu) copies, or None (nothing changed) when there is not enough room.
        """
        cpu_ids = self.req_to_cpu_blocks[request.req_id]
        num_total = request.num_computed_tokens + num_new_tokens + self.num_lookahead_slots
        if max(cdiv(num_total, self.block_size), len(cpu_ids)) > self.pool.num_free_blocks:
            return None
        new_blocks = self.pool.get_new_blocks(len(cpu_ids))
        self.req_to_blocks[request.req_id] = new_blocks
        del self.req_to_cpu_blocks[request.req_id]
        self._cpu_free.extend(cpu_ids)
        self._cache_full_blocks(request, request.num_computed_tokens)
        allocated = self.allocate_slots(request, num_new_tokens)
        assert allocated is not None, "room was checked above"
        return [(c, b.block_id) for c, b in zip(cpu_ids, new_blocks)]

    def can_swap_out_ever(self, request: Request) -> bool:
        return len(self.req_to_blocks.get(request.req_id, [])) <= self.num_cpu_blocks
