"""Chained block hashes for prefix caching.

A full block's identity is (hash of its parent block, its token ids, extra keys such as an
adapter name). Keys keep the token ids themselves, so two different blocks can never be
confused by a hash collision: the dict lookup compares the whole key.
"""
from __future__ import annotations

from typing import NamedTuple


class BlockHash(NamedTuple):
    hash_value: int
    token_ids: tuple[int, ...]
    extra_keys: tuple | None = None


def hash_block_tokens(parent: BlockHash | None, token_ids: tuple[int, ...],
                      extra_keys: tuple | None = None) -> BlockHash:
    parent_value = parent.hash_value if parent is not None else None
    return BlockHash(hash((parent_value, token_ids, extra_keys)), token_ids, extra_keys)


def hash_request_blocks(token_ids: list[int], block_size: int, start: list[BlockHash],
                        extra_keys: tuple | None = None) -> list[BlockHash]:
    """Extend ``start`` (hashes already known for this request) over every full block."""
    hashes = list(start)
    parent = hashes[-1] if hashes else None
    for begin in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tuple(token_ids[begin:begin + block_size]), extra_keys)
        hashes.append(parent)
    return hashes
