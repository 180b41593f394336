"""The step advance of a multi-step decode batch that replays a CUDA graph, in one kernel.

Between two steps of a multi-step batch (``ModelRunner._launch_steps``) every sequence
moves on by one token: its input id becomes the id just sampled, its position and sequence
length grow by one, and its slot is read from its block table at the new position. The
eager path builds these as new tensors (~8 small torch kernels) and the graph runner copies
them into its static buffers (~5 more); ``advance`` updates the static buffers in place in
one Triton launch (rows >= n, the graph's padding, are untouched). CUDA only;
``advance_ref`` is the torch version and the oracle of the kernel test.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _advance_kernel(ids_ptr, input_ids_ptr, pos_ptr, slot_ptr, seq_lens_ptr, table_ptr, n,
                    stride_table, block_size, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    mask = rows < n
    pos = tl.load(pos_ptr + rows, mask=mask, other=0) + 1
    block = tl.load(table_ptr + rows.to(tl.int64) * stride_table + pos // block_size,
                    mask=mask, other=0)
    tl.store(input_ids_ptr + rows, tl.load(ids_ptr + rows, mask=mask, other=0), mask=mask)
    tl.store(pos_ptr + rows, pos, mask=mask)
    tl.store(slot_ptr + rows, block.to(tl.int64) * block_size + pos % block_size, mask=mask)
    tl.store(seq_lens_ptr + rows, tl.load(seq_lens_ptr + rows, mask=mask, other=0) + 1,
             mask=mask)


def advance(ids: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
            slot_mapping: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
            block_size: int) -> None:
    """In place, for the first n = len(ids) rows: input_ids = ids, positions += 1,
    seq_lens += 1, slot_mapping = block_table[row, pos // block_size] * block_size +
    pos % block_size. input_ids, positions, slot_mapping: int64; seq_lens, block_table:
    int32 (the graph runner's buffers)."""
    n = ids.shape[0]
    if n > input_ids.shape[0] or block_table.stride(1) != 1:
        raise ValueError(f"advance takes at most {input_ids.shape[0]} rows and a row-major "
                         f"block table, got {n} rows, strides {block_table.stride()}")
    if n:
        _advance_kernel[(1,)](ids, input_ids, positions, slot_mapping, seq_lens, block_table,
                              n, block_table.stride(0), block_size,
                              BLOCK=max(16, triton.next_power_of_2(n)), num_warps=4)


def advance_ref(ids, input_ids, positions, slot_mapping, seq_lens, block_table, block_size):
    n = ids.shape[0]
    pos = positions[:n] + 1
    block = block_table[:n].gather(1, (pos // block_size).unsqueeze(1)).squeeze(1)
    input_ids[:n] = ids
    positions[:n] = pos
    slot_mapping[:n] = block.long() * block_size + pos % block_size
    seq_lens[:n] += 1
