"""Block pool and KV-cache manager: exact block ids, reference counts and eviction order."""
import pytest

from pagedllm.core.block_hash import hash_request_blocks
from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams


def _req(req_id, token_ids, max_tokens=8):
    return Request(req_id, token_ids, SamplingParams(max_tokens=max_tokens))


def test_fresh_pool_hands_out_ids_in_order():
    pool = BlockPool(6, enable_caching=False)
    assert [b.block_id for b in pool.get_new_blocks(3)] == [0, 1, 2]
    assert pool.free_block_ids() == [3, 4, 5]
    assert all(b.ref_cnt == 1 for b in pool.blocks[:3])


def test_free_appends_to_tail_in_given_order():
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(list(reversed(blocks)))
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 2]


def test_shared_block_freed_only_at_zero_refs():
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert block.ref_cnt == 1 and pool.free_block_ids() == [1]
    pool.free_blocks([block])
    assert pool.free_block_ids() == [1, 0]


def test_over_allocation_raises():
    with pytest.raises(ValueError):
        BlockPool(2, enable_caching=False).get_new_blocks(3)


def test_allocate_slots_counts_blocks_and_lookahead():
    kv = KVCacheManager(10, 0, block_size=4, enable_caching=False, num_lookahead_slots=2)
    req = _req("a", list(range(9)))
    new = kv.allocate_slots(req, 9)  # 9 tokens + 2 lookahead = 11 slots -> 3 blocks
    assert [b.block_id for b in new] == [0, 1, 2]
    req.num_computed_tokens = 9
    req.append_output_token(100)
    assert kv.allocate_slots(req, 1) == []  # slot 10 is still inside block 2 (+2 -> 12)
    req.num_computed_tokens = 10
    req.append_output_token(101)
    assert [b.block_id for b in kv.allocate_slots(req, 1)] == [3]  # 11 + 2 = 13 slots
    assert kv.get_block_ids("a") == [0, 1, 2, 3]


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(2, 0, block_size=4, enable_caching=False)
    req = _req("a", list(range(12)))
    assert kv.allocate_slots(req, 12) is None
    assert kv.num_free_blocks == 2 and kv.get_block_ids("a") == []


def test_prefix_cache_hit_shares_blocks_and_counts_refs():
    kv = KVCacheManager(8, 0, block_size=4, enable_caching=True)
    a = _req("a", list(range(10)))
    kv.allocate_slots(a, 10)
    assert kv.get_block_ids("a") == [0, 1, 2]
    b = _req("b", list(range(8)) + [50, 51, 52])
    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit_tokens == 8
    new = kv.allocate_slots(b, 3, hits)
    assert [x.block_id for x in new] == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]


def test_whole_prompt_hit_recomputes_last_token():
    kv = KVCacheManager(8, 0, block_size=4, enable_caching=True)
    a = _req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    b = _req("b", list(range(8)))
    hits, num_hit_tokens = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and num_hit_tokens == 4


def test_eviction_takes_lru_and_tail_blocks_first():
    kv = KVCacheManager(4, 0, block_size=2, enable_caching=True)
    a = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)  # blocks 0 [1,2], 1 [3,4], 2 [5]
    a.status = a.status.FINISHED_STOPPED
    kv.free(a)
    assert kv.pool.free_block_ids() == [3, 2, 1, 0]  # tail of 'a' evicted before its head
    assert len(kv.pool.cached_blocks) == 2
    b = _req("b", [9, 9, 9, 9])
    assert [x.block_id for x in kv.allocate_slots(b, 4)] == [3, 2]
    assert len(kv.pool.cached_blocks) == 4  # 3 and 2 held no hash; now they hold b's
    c = _req("c", [7, 7])
    assert [x.block_id for x in kv.allocate_slots(c, 2)] == [1]  # evicts [3,4]
    hits, _ = kv.get_computed_blocks(_req("d", [1, 2, 3, 4, 6]))
    assert [h.block_id for h in hits] == [0]  # [1,2] survived, [3,4] was evicted


def test_chained_hash_depends_on_parent():
    h1 = hash_request_blocks([1, 2, 3, 4], 2, [])
    h2 = hash_request_blocks([9, 9, 3, 4], 2, [])
    assert h1[1].token_ids == h2[1].token_ids and h1[1] != h2[1]


def test_swap_out_and_in_block_ids():
    kv = KVCacheManager(4, 3, block_size=2, enable_caching=False)
    a = _req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    a.num_computed_tokens = 3
    assert kv.swap_out(a) == [(0, 0), (1, 1)]
    assert kv.num_free_blocks == 4 and kv.cpu_usage() == pytest.approx(2 / 3)
    kv.allocate_slots(_req("b", [5, 6]), 2)  # takes block 2
    assert kv.swap_in(a, 1) == [(0, 3), (1, 1)]
    assert kv.get_block_ids("a") == [3, 1]
    assert kv.cpu_usage() == 0.0
