"""Top-k, top-p (nucleus) and min-p filtering: masked tokens get ``-inf``.

Only the rows that use a filter are touched (``rows``). Top-k then top-p (on the
renormalised top-k distribution, like vLLM) are turned into one threshold logit per row:
1. sort each row's logits, values only (on CPU with numpy, whose SIMD sort is ~10x faster
   than torch's; no argsort and no scatter back are needed);
2. top-k: the k-th largest value; top-p: with probabilities of the sorted (top-k-masked) row,
   the kept tokens are the prefix whose mass before them is below ``top_p``, so the
   threshold is the last kept value;
3. mask every logit below the larger threshold.
This equals the sort-and-mask definition (``_filter_sorted``, the test oracle) except that
tokens tied with the threshold value are all kept. Min-p runs after them, like vLLM:
tokens whose probability is below ``min_p * max probability`` are removed.

These ops materialise the filtered logits; the CPU sampler uses them only where it needs
the filtered row (logprobs) or as its exact fallback (``sorting_free.py`` samples the same
distribution without a sort). ``top_values`` is the exact top-K selection both use.
"""
from __future__ import annotations

import numpy as np
import torch

_NEG_INF = -float("inf")


def _filter_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor | None) -> torch.Tensor:
    """The definition on descending-sorted rows: mask ranks >= k, then tokens whose
    probability mass before them reaches top_p (the first token is always kept)."""
    if top_k is not None:
        ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], _NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], _NEG_INF)
    return sorted_logits


def _sort_descending(values: torch.Tensor) -> torch.Tensor:
    if values.device.type == "cpu" and values.dtype == torch.float32:
        # Sort the negated values ascending, then negate back in place: exact, and cheaper
        # than copying a reversed view.
        negated = np.negative(values.numpy())
        negated.sort(axis=-1)
        return torch.from_numpy(np.negative(negated, out=negated))
    return values.sort(dim=-1, descending=True).values


GROUP_SIZE = 32  # tokens per group of the top-K prefilter


def _top_sorted(x: torch.Tensor, k: int, ordered: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, sorted=ordered)`` (values, positions); on CPU through numpy's introselect
    (and a sort of the k values), ~3x faster than torch's topk."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.topk(k, dim=-1, sorted=ordered)
    a = x.numpy()
    rows = np.arange(a.shape[0])[:, None]
    pos = np.argpartition(a, a.shape[1] - k, axis=-1)[:, a.shape[1] - k:]
    values = a[rows, pos]
    if ordered:
        order = np.argsort(-values, axis=-1, kind="stable")
        values, pos = values[rows, order], pos[rows, order]
    return torch.from_numpy(values), torch.from_numpy(pos)


def top_values(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row, descending, and their indices (like ``topk``).

    On wide rows a prefilter keeps only the k groups with the largest maxima (group g: the
    tokens g, g + G, g + 2G, ... of the row viewed as [GROUP_SIZE, G]; a strided max over
    that view is one vectorised pass). Those k maxima are k distinct tokens >= the k-th group
    maximum m, so the k-th largest value is >= m, while every token outside those groups is
    <= its group's maximum <= m: the k largest values all lie in the kept groups (with ties at
    the k-th value, the kept groups still hold at least k tokens >= it). Tokens past the last
    full group are always candidates."""
    n, vocab = x.shape
    num_groups = vocab // GROUP_SIZE
    if k * GROUP_SIZE * 4 > vocab:
        return _top_sorted(x, k)
    end = num_groups * GROUP_SIZE
    view = x[:, :end].view(n, GROUP_SIZE, num_groups)
    groups = _top_sorted(view.amax(1), k, ordered=False)[1].to(x.device)  # [n, k]
    candidates = view.gather(2, groups[:, None, :].expand(n, GROUP_SIZE, k)).view(n, -1)
    if end < vocab:
        candidates = torch.cat([candidates, x[:, end:]], 1)
    values, pos = _top_sorted(candidates, k)  # position p < GROUP_SIZE * k: group p % k
    if x.device.type == "cpu":
        pos, groups = pos.numpy(), groups.numpy()
        in_group = pos < GROUP_SIZE * k
        ids = (pos // k) * num_groups + np.take_along_axis(groups, pos % k, 1)
        return values, torch.from_numpy(np.where(in_group, ids, pos - GROUP_SIZE * k + end))
    in_group = pos < GROUP_SIZE * k
    ids = (pos // k) * num_groups + groups.gather(1, pos % k)
    return values, torch.where(in_group, ids, pos - GROUP_SIZE * k + end)


def apply_top_k_top_p(logits: torch.Tensor,  # [num_rows, vocab]
                      rows: torch.Tensor,  # [num_filtered] rows that use top-k or top-p
                      top_k: torch.Tensor | None,  # [num_filtered] vocab where off
                      top_p: torch.Tensor | None,  # [num_filtered] 1.0 where off
                      max_top_k: int | None = None) -> torch.Tensor:
    """``max_top_k`` (the largest k when every filtered row sets one) only narrows the sort."""
    sub = logits[rows]
    if max_top_k is not None and top_p is None:
        kept = sub.topk(max_top_k, dim=-1).values  # [num_filtered, max_top_k], descending
    else:
        kept = _sort_descending(sub)  # [num_filtered, vocab]
    if top_k is not None:
        ranks = torch.arange(kept.shape[-1], device=kept.device)
        kept = kept.masked_fill(ranks[None, :] >= top_k[:, None], _NEG_INF)
    num_kept = (kept > _NEG_INF).sum(dim=-1)  # >= 1: top_k >= 1
    if top_p is not None:
        probs = kept.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        num_kept = torch.minimum(num_kept, (mass_before < top_p[:, None]).sum(dim=-1))
    threshold = kept.gather(1, (num_kept - 1).clamp(min=0)[:, None])  # [num_filtered, 1]
    logits[rows] = sub.masked_fill_(sub < threshold, _NEG_INF)
    return logits


def apply_min_p(logits: torch.Tensor, rows: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """rows [num_filtered], min_p [num_filtered]. ``p < min_p * p_max`` is tested in logit
    space (``logit < max_logit + log(min_p)``), which needs no softmax."""
    sub = logits[rows]
    threshold = sub.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    logits[rows] = sub.masked_fill_(sub < threshold, _NEG_INF)
    return logits
