"""Top-k, top-p (nucleus) and min-p filtering: masked tokens get ``-inf``.

Only the rows that use a filter are touched (``rows``). Top-k then top-p (on the
renormalised top-k distribution, like vLLM) share one descending order of candidates. A full
sort of the vocabulary is the slow part on CPU, so candidates come from ``topk(K)`` with
``K = max(max top-k, 1024)``; that is exact for a row whose top-k is <= K, or which has no
top-k and whose top K tokens already hold ``top_p`` of the mass (the nucleus lies inside
them). Only the other rows are fully sorted. Min-p runs after them, like vLLM: tokens whose
probability is below ``min_p * max probability`` are removed.
"""
from __future__ import annotations

import torch

_NEG_INF = -float("inf")
_NUM_CANDIDATES = 1024


def _filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor | None) -> torch.Tensor:
    if top_k is not None:
        ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], _NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Keep tokens until the mass before them reaches top_p; the first is always kept.
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], _NEG_INF)
    return sorted_logits


def apply_top_k_top_p(logits: torch.Tensor,  # [num_rows, vocab]
                      rows: torch.Tensor,  # [num_filtered] rows that use top-k or top-p
                      top_k: torch.Tensor | None,  # [num_filtered] vocab where off
                      top_p: torch.Tensor | None,  # [num_filtered] 1.0 where off
                      max_top_k: int | None) -> torch.Tensor:
    """``max_top_k``: the largest k when every filtered row sets one, else None."""
    sub = logits[rows]
    vocab_size = sub.shape[-1]
    num_candidates = min(vocab_size, max(max_top_k or 0, _NUM_CANDIDATES))
    cand_logits, cand_ids = sub.topk(num_candidates, dim=-1)
    exact = torch.ones(sub.shape[0], dtype=torch.bool, device=sub.device)
    if max_top_k is None and num_candidates < vocab_size:
        k = top_k if top_k is not None else torch.full_like(exact, vocab_size, dtype=torch.long)
        exact = k <= num_candidates
        if top_p is not None:
            mass = (cand_logits.logsumexp(-1) - sub.logsumexp(-1)).exp()
            exact |= (k == vocab_size) & (mass >= top_p)
    filtered = torch.full_like(sub, _NEG_INF)
    filtered.scatter_(-1, cand_ids, _filter_sorted(cand_logits, top_k, top_p))
    if not bool(exact.all()):  # host sync only on this rare fallback
        slow = (~exact).nonzero().squeeze(1)
        sorted_logits, order = sub[slow].sort(dim=-1, descending=True)
        filtered[slow] = torch.empty_like(sorted_logits).scatter_(
            -1, order, _filter_sorted(sorted_logits, _pick(top_k, slow), _pick(top_p, slow)))
    logits[rows] = filtered
    return logits


def _pick(values: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values[idx]


def apply_min_p(logits: torch.Tensor, rows: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """rows [num_filtered], min_p [num_filtered]. ``p < min_p * p_max`` is tested in logit
    space (``logit < max_logit + log(min_p)``), which needs no softmax."""
    sub = logits[rows]
    threshold = sub.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    logits[rows] = sub.masked_fill_(sub < threshold, _NEG_INF)
    return logits
