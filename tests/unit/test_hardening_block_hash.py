"""Issue 24, finding 1: the prefix cache cannot be poisoned through block-hash collisions.

Oracle: CPython's integer hash, where ``hash(-1) == hash(-2)`` (-1 is reserved as an error
value), so the tuples ``(-1, 5)`` and ``(-2, 5)`` collide under ``hash()``. A first block of
each then has the same parent value for the next block, and an attacker who sends the colliding
prefix followed by the victim's next block used to have that block's KV served to the victim.
"""
import hashlib

from pagedllm.core.block_hash import BlockHash, hash_block_tokens, hash_request_blocks
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams

VICTIM_HEAD, ATTACKER_HEAD = (-1, 5), (-2, 5)


def _req(req_id, token_ids):
    return Request(req_id, list(token_ids), SamplingParams(max_tokens=4))


def test_the_heads_collide_under_python_hash():
    assert VICTIM_HEAD != ATTACKER_HEAD
    assert hash(VICTIM_HEAD) == hash(ATTACKER_HEAD)
    assert hash((None, VICTIM_HEAD, None)) == hash((None, ATTACKER_HEAD, None))


def test_colliding_blocks_get_different_digests_and_so_do_their_children():
    victim = hash_request_blocks([*VICTIM_HEAD, 7, 8], 2, [])
    attacker = hash_request_blocks([*ATTACKER_HEAD, 7, 8], 2, [])
    assert victim[0].hash_value != attacker[0].hash_value
    # same tokens, different parents: the child keys must differ too
    assert victim[1].token_ids == attacker[1].token_ids
    assert victim[1] != attacker[1] and victim[1].hash_value != attacker[1].hash_value
    assert all(isinstance(h.hash_value, bytes) and len(h.hash_value) == 32
               for h in victim + attacker)


def test_digest_is_sha256_over_parent_extra_keys_and_ids():
    """Chained: the child's digest is recomputable from the parent's digest alone."""
    parent = hash_block_tokens(None, (1, 2), ("lora", 1))
    child = hash_block_tokens(parent, (3, 4), ("lora", 1))
    extra = repr(("lora", 1)).encode()
    ids = b"q" + (3).to_bytes(8, "little") + (4).to_bytes(8, "little")
    expected = hashlib.sha256(parent.hash_value + len(extra).to_bytes(8, "little") + extra
                              + ids).digest()
    assert child.hash_value == expected
    assert hash_block_tokens(parent, (3, 4)) != child  # extra keys are hashed
    assert hash_request_blocks([1, 2, 3, 4], 2, [], ("lora", 1))[1] == child


def test_first_block_parent_is_not_a_constant():
    """The first block's parent is the per-process seed, not a public value such as 32 zero
    bytes or the empty digest, so digests cannot be precomputed offline."""
    first = hash_block_tokens(None, (1, 2))
    for public in (b"\0" * 32, hashlib.sha256().digest(), b""):
        guess = hashlib.sha256(public + (4).to_bytes(8, "little") + b"None"
                               + b"q" + (1).to_bytes(8, "little") + (2).to_bytes(8, "little"))
        assert first.hash_value != guess.digest()


def test_ids_outside_int64_still_hash_and_differ():
    big = hash_block_tokens(None, (2 ** 70, 1))
    small = hash_block_tokens(None, (2 ** 6, 1))
    assert big != small and isinstance(big, BlockHash)


def test_prefix_cache_does_not_serve_the_attackers_block():
    """The victim's head is cached (a shared system prompt); the attacker then caches its
    colliding head followed by the victim's second block. The victim must get only its own
    head from the cache and recompute the rest."""
    kv = KVCacheManager(16, 0, block_size=2, enable_caching=True)
    owner = _req("owner", [*VICTIM_HEAD, 0])
    head_block = kv.allocate_slots(owner, 3)[0]
    attacker = _req("attacker", [*ATTACKER_HEAD, 7, 8, 0])
    attacker_blocks = kv.allocate_slots(attacker, 5)
    assert len(kv.pool.cached_blocks) == 3  # owner's head, attacker's head and second block
    victim = _req("victim", [*VICTIM_HEAD, 7, 8, 0])
    hits, num_tokens = kv.get_computed_blocks(victim)
    assert [b.block_id for b in hits] == [head_block.block_id]
    assert num_tokens == 2
    assert attacker_blocks[1] not in hits


def test_same_prefix_still_hits():
    """Not a regression: an identical prefix is served from the cache."""
    kv = KVCacheManager(16, 0, block_size=2, enable_caching=True)
    first = kv.allocate_slots(_req("a", [1, 2, 3, 4, 0]), 5)
    hits, num_tokens = kv.get_computed_blocks(_req("b", [1, 2, 3, 4, 9]))
    assert [b.block_id for b in hits] == [b.block_id for b in first[:2]] and num_tokens == 4
