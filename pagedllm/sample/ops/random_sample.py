"""Drawing one token per row from non-negative weights by inverse-CDF sampling, and the
uniform numbers that drive it.

A row needs one uniform ``u`` per draw: the token is the first index whose cumulative weight
exceeds ``u * total``. Tokens with zero weight (filtered) have zero width and are never
chosen. ``inverse_cdf`` (any device) and ``draw_cpu`` (CPU, the small steps in numpy) never
build the full cumulative sum: they sum blocks of ``BLOCK`` tokens (one vectorised
reduction), find the block on the [rows, blocks] cumulative sums, and run the cumulative sum
only inside that block. All row reductions here go through blocks shorter than torch's
parallel grain, so every row's result is the same whatever else is in the batch.

Uniforms: unseeded rows take theirs from the engine generator (``--seed``). A seeded request
takes them from a counter-based hash of (seed, index of the token being sampled, draw
number), so it gives the same tokens whatever else is in the batch, after preemption and
with chunked prefill, and computing them costs a few numpy ops for the whole batch instead
of one generator per row.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 128  # tokens per block of the block sums

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (array arithmetic wraps modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_uniforms(seeds: np.ndarray, indices: np.ndarray, num_cols: int) -> np.ndarray:
    """[n] uint64 seeds, [n] token indices -> [n, num_cols] float64 uniforms in [0, 1):
    column c is a hash of (seed, index, c), independent of everything else."""
    key = _mix64(_mix64(seeds + _GOLDEN) ^ indices.astype(np.uint64))
    counters = key[:, None] + np.arange(1, num_cols + 1, dtype=np.uint64) * _GOLDEN
    return (_mix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def seed_array(seeds: list[int]) -> np.ndarray:
    return np.array([s & _MASK64 for s in seeds], dtype=np.uint64)


def uniform_per_row(num_rows: int, num_cols: int, generator: torch.Generator | None,
                    seeded_rows: torch.Tensor | None, seeds: np.ndarray | None,
                    indices: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """[num_rows, num_cols] float64 uniforms; the seeded rows' from ``seeded_uniforms``."""
    u = torch.rand(num_rows, num_cols, generator=generator, dtype=torch.float64, device=device)
    if seeded_rows is not None:
        values = torch.from_numpy(seeded_uniforms(seeds, indices, num_cols))
        u[seeded_rows.to(device)] = values.to(device)
    return u


def block_sums(w: torch.Tensor) -> torch.Tensor:
    """[n, V] contiguous rows -> [n, ceil(V / BLOCK)] fp32 sums of consecutive blocks."""
    n, vocab = w.shape
    num_full = vocab // BLOCK
    end = num_full * BLOCK
    if end == vocab:
        return w.view(n, num_full, BLOCK).sum(-1)
    tail = w[:, end:].sum(-1, keepdim=True)
    return torch.cat([w[:, :end].view(n, num_full, BLOCK).sum(-1), tail], 1) if num_full \
        else tail


def _first_above(cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds ``target`` [n, 1], but never
    past the last index that adds weight (``u * total`` can round up to the total)."""
    return torch.minimum(torch.searchsorted(cum, target, right=True),
                         torch.searchsorted(cum, cum[:, -1:].contiguous()))


def inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, V] non-negative weights (unnormalised, contiguous rows), u [n] float64 ->
    (ids [n] int64, row totals [n] float64). Never returns a zero-weight token of a row
    whose total is positive."""
    n, vocab = w.shape
    # cumulative block sums with a leading 0: cum[b + 1] - cum[b] is block b's weight
    sums = block_sums(w)
    cum = torch.cat([sums.new_zeros((n, 1), dtype=torch.float64),
                     sums.cumsum(-1, dtype=torch.float64)], 1)
    total = cum[:, -1:]
    target = u[:, None] * total
    block = (_first_above(cum, target) - 1).clamp_(min=0)  # [n, 1]
    rest = target - cum.gather(1, block)
    if vocab % BLOCK == 0:
        inner = w.view(n, -1, BLOCK).gather(1, block[:, :, None].expand(n, 1, BLOCK))[:, 0]
    else:
        offsets = block * BLOCK + torch.arange(BLOCK, device=w.device)
        inner = w.gather(1, offsets.clamp(max=vocab - 1)).masked_fill_(offsets >= vocab, 0.0)
    # rounding between the fp32 block sum and this fp64 cumsum: _first_above stays on the
    # block's last token with weight
    pos = _first_above(inner.cumsum(-1, dtype=torch.float64), rest)
    return (block * BLOCK + pos).squeeze(1), total.squeeze(1)


def draw_cpu(w: torch.Tensor | list[torch.Tensor], u: np.ndarray,
             sums: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``inverse_cdf`` for CPU tensors with the small steps in numpy (a torch op costs
    several microseconds, a numpy op on these few hundred values about one): w [n, V]
    non-negative weights (contiguous rows; or a list of such tensors, their rows stacked),
    u [n] float64, ``sums``: their ``block_sums`` if already known -> (ids [n] int64,
    totals [n] float64)."""
    parts = w if isinstance(w, list) else [w]
    vocab = parts[0].shape[1]
    if sums is None:
        sums = np.concatenate([block_sums(p).numpy() for p in parts]) if len(parts) > 1 \
            else block_sums(parts[0]).numpy()
    cum = np.cumsum(sums, axis=1, dtype=np.float64)  # [n, num_blocks]
    n = len(cum)
    total = cum[:, -1]
    target = (u * total)[:, None]
    # first block whose cumulative weight exceeds the target, never past the last block with
    # weight (u * total can round up to the total)
    block = np.minimum((cum <= target).sum(1), (cum < cum[:, -1:]).sum(1))
    before = np.take_along_axis(cum, np.maximum(block - 1, 0)[:, None], 1)
    target = target - np.where(block[:, None] > 0, before, 0.0)
    offsets = block[:, None] * BLOCK + np.arange(BLOCK)
    clipped = np.minimum(offsets, vocab - 1) if vocab % BLOCK else offsets
    if len(parts) == 1:
        inner = parts[0].numpy()[np.arange(n)[:, None], clipped]
    else:
        inner, start = [], 0
        for p in parts:
            end = start + p.shape[0]
            inner.append(p.numpy()[np.arange(end - start)[:, None], clipped[start:end]])
            start = end
        inner = np.concatenate(inner)
    if vocab % BLOCK:
        inner[offsets >= vocab] = 0.0
    inner_cum = np.cumsum(inner, axis=1, dtype=np.float64)
    # rounding between the fp32 block sum and this fp64 cumsum: stay on the block's last
    # token with weight
    pos = np.minimum((inner_cum <= target).sum(1), (inner_cum < inner_cum[:, -1:]).sum(1))
    return block * BLOCK + pos, total
