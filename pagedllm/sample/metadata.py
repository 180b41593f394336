"""Per-step sampling parameters as tensors, one row per request that samples this step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.sampling_params import SamplingParams

_EPS = 1e-5


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_rows] 1.0 where greedy (unused there)
    is_greedy: torch.Tensor  # [num_rows] bool
    top_k: torch.Tensor | None  # [num_rows] int, vocab size where off; None if all off
    top_p: torch.Tensor | None  # [num_rows] float; None if all 1.0
    all_greedy: bool
    # (row, seed, index of the token being sampled) for seeded requests
    seeded_rows: list[tuple[int, int, int]]
    generator: torch.Generator | None  # engine-wide generator (--seed) for unseeded rows


def build_sampling_metadata(params: list[SamplingParams], output_lens: list[int],
                            vocab_size: int, generator: torch.Generator | None,
                            device: torch.device) -> SamplingMetadata:
    """Gather the rows' parameters once per step (the only Python loop over requests)."""
    temps, greedy, top_ks, top_ps, seeded = [], [], [], [], []
    for row, (p, num_out) in enumerate(zip(params, output_lens)):
        is_greedy = p.temperature < _EPS
        greedy.append(is_greedy)
        temps.append(1.0 if is_greedy else p.temperature)
        top_ks.append(vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size))
        top_ps.append(p.top_p)
        if p.seed is not None and not is_greedy:
            seeded.append((row, p.seed, num_out))
    all_greedy = all(greedy)
    use_k = not all_greedy and any(k < vocab_size for k in top_ks)
    use_p = not all_greedy and any(pv < 1.0 for pv in top_ps)
    return SamplingMetadata(
        temperature=torch.tensor(temps, dtype=torch.float32, device=device),
        is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        top_k=torch.tensor(top_ks, dtype=torch.long, device=device) if use_k else None,
        top_p=torch.tensor(top_ps, dtype=torch.float32, device=device) if use_p else None,
        all_greedy=all_greedy, seeded_rows=seeded, generator=generator)
