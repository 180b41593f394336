"""Drawing one token per row from ``probs`` by inverse-CDF sampling.

Each row needs one uniform number ``u``: the token is the first index whose cumulative
probability exceeds ``u * total``. Tokens with zero probability (filtered) have zero width
and can never be chosen. Unseeded rows take ``u`` from the engine generator (``--seed``);
a seeded request takes it from a generator seeded with (seed, index of the token being
sampled), so it gives the same tokens whatever else is in the batch, after preemption and
with chunked prefill. One uniform per row (instead of one exponential per vocab entry)
keeps sampling cheap on CPU.
"""
from __future__ import annotations

import torch


def seeded_key(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF


def uniform_per_row(num_rows: int, generator: torch.Generator | None,
                    seeded_rows: list[tuple[int, int, int]],
                    device: torch.device) -> torch.Tensor:
    """[num_rows] uniforms in [0, 1); seeded_rows: (row, seed, token index)."""
    u = torch.rand(num_rows, generator=generator, dtype=torch.float64, device=device)
    if seeded_rows:
        gen = torch.Generator(device=device)
        values = []
        for _, seed, index in seeded_rows:
            gen.manual_seed(seeded_key(seed, index))
            values.append(torch.rand(1, generator=gen, dtype=torch.float64, device=device))
        u[torch.tensor([r for r, _, _ in seeded_rows], device=device)] = torch.cat(values)
    return u


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [num_rows, vocab] (unnormalised is fine), u [num_rows] -> ids [num_rows]."""
    cdf = probs.cumsum(dim=-1)
    targets = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    ids = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return ids.clamp_(max=probs.shape[-1] - 1)
