"""One batched sampler for the whole step.

Pipeline, in order, over [num_rows, vocab] fp32 logits:
1. temperature: divide each row by its temperature (greedy rows keep their raw logits);
2. top-k then top-p: one descending sort, mask what falls outside, scatter back;
3. sample: softmax, then argmax(probs / E) with E ~ Exponential(1) per vocab entry (the
   exponential race, equivalent to drawing from probs). Seeded requests draw E from a
   generator seeded with (seed, token index), so a seeded request gives the same tokens
   whatever else is in the batch, and after preemption;
4. greedy rows take argmax of their raw logits.
No host sync happens here; the runner copies the sampled ids to the host once.
"""
from __future__ import annotations

import torch

from pagedllm.sample.metadata import SamplingMetadata


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], -float("inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep tokens until the mass before them reaches top_p; the first is always kept.
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], -float("inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _exponential_noise(probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(generator=meta.generator)
    if meta.seeded_rows:
        gen = torch.Generator(device=probs.device)
        for row, seed, index in meta.seeded_rows:
            gen.manual_seed((seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
            noise[row].exponential_(generator=gen)
    return noise


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """logits [num_rows, vocab] -> sampled token ids [num_rows] (int64, on device)."""
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy_ids
        scaled = logits / meta.temperature[:, None]
        scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p)
        probs = scaled.softmax(dim=-1)
        random_ids = (probs / _exponential_noise(probs, meta)).argmax(dim=-1)
        return torch.where(meta.is_greedy, greedy_ids, random_ids)
