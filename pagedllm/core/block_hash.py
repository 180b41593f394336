"""Chained block hashes for prefix caching.

A full block's identity is a SHA-256 digest over (its parent's digest, its token ids, extra
keys such as an adapter name). The prefix cache serves a block's KV to any request whose
chain of digests matches, so the digest must be collision resistant: Python's ``hash()`` of a
tuple is unkeyed and cheap to invert, which let one request plant KV that another request's
different prefix then reused (the bug class of vLLM's GHSA-rm76-4mrf-v9r8). The first block's
parent is a random per-process seed, so digests cannot be precomputed offline either.

``BlockHash`` compares and hashes by its digest alone: the digest already covers the token ids
and extra keys, and keying by 32 bytes keeps dict lookups cheaper than hashing the ids again.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
from typing import NamedTuple

# Parent digest of every request's first block; random per process (never persisted or shared:
# block hashes only ever meet in this process's scheduler).
_ROOT_PARENT = os.urandom(32)


class BlockHash(NamedTuple):
    hash_value: bytes  # SHA-256 digest of (parent digest, token ids, extra keys)
    token_ids: tuple[int, ...]
    extra_keys: tuple | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockHash) and self.hash_value == other.hash_value

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.hash_value)


@functools.lru_cache(maxsize=16)
def _int64_packer(count: int):
    return struct.Struct(f"<{count}q").pack


def _token_bytes(token_ids: tuple[int, ...]) -> bytes:
    """An injective encoding of the ids: a tag, then fixed-width int64s (``repr`` for ids
    outside int64, under another tag, so the two encodings never meet)."""
    try:
        return b"q" + _int64_packer(len(token_ids))(*token_ids)
    except struct.error:
        return b"r" + repr(token_ids).encode()


def _extra_bytes(extra_keys: tuple | None) -> bytes:
    """``repr(extra_keys)`` (ints and strings: an injective text), length-prefixed so that the
    token bytes after it, which run to the end, cannot be confused with it."""
    text = repr(extra_keys).encode("utf-8", "backslashreplace")
    return len(text).to_bytes(8, "little") + text


def _digest(parent: BlockHash | None, extra: bytes, token_ids: tuple[int, ...]) -> bytes:
    parent_digest = parent.hash_value if parent is not None else _ROOT_PARENT
    return hashlib.sha256(parent_digest + extra + _token_bytes(token_ids)).digest()


def hash_block_tokens(parent: BlockHash | None, token_ids: tuple[int, ...],
                      extra_keys: tuple | None = None) -> BlockHash:
    """The block after ``parent`` (None: the first block) holding ``token_ids``: SHA-256 over
    the parent's 32-byte digest, the length-prefixed extra keys, then the ids."""
    return BlockHash(_digest(parent, _extra_bytes(extra_keys), token_ids), token_ids,
                     extra_keys)


def hash_request_blocks(token_ids: list[int], block_size: int, start: list[BlockHash],
                        extra_keys: tuple | None = None) -> list[BlockHash]:
    """Extend ``start`` (hashes already known for this request) over every full block."""
    hashes = list(start)
    parent = hashes[-1] if hashes else None
    extra = _extra_bytes(extra_keys)  # once per call: the scheduler's hot path
    for begin in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        block = tuple(token_ids[begin:begin + block_size])
        parent = BlockHash(_digest(parent, extra, block), block, extra_keys)
        hashes.append(parent)
    return hashes
