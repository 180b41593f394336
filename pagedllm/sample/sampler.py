"""One batched sampler for the whole step.

Pipeline, in order, over [num_rows, vocab] fp32 logits (every op only touches the rows that
use it; see ``metadata.py``):
1. penalties: repetition (prompt + output tokens), frequency and presence (output tokens),
   sparse over the distinct ids of each row's history;
2. allowed_token_ids (one additive mask) and logit_bias (sparse);
3. min_tokens: stop ids (EOS unless ignore_eos, stop_token_ids) get -inf until reached;
4. logits processors: per-request Python callables, looping only over rows that have them;
   then guided decoding: the token masks of all constrained rows, in one op (a row keeps
   only the tokens its grammar allows next, so even greedy rows obey it);
5. greedy rows take the argmax here (their temperature counts as 1.0);
6. random rows: temperature, then top-k, top-p (on the renormalised top-k distribution),
   min-p, then one draw from the softmax over the tokens kept. On CPU nothing sorts the
   vocabulary (``ops/sorting_free.py``; the runner computes the logits with each path's rows
   contiguous, so paths work on views):
   - rows with 1 <= top-k <= 256: the k + 1 largest logits (a strided group-maximum
     prefilter, then numpy's introselect on ~32 (k + 1) candidates); temperature, top-p,
     min-p and the draw on those candidates;
   - rows without top-k: temperature (rows with T != 1), one softmax, an inverse-CDF draw
     through block sums, then exact rejection for top-p / min-p: accept iff the drawn token
     is in the kept set (top-p: the mass of strictly larger logits < top_p), else redraw
     from the tokens above the bound the rejection proved (usually no second round);
   - the rest (top-k > 256, a tied top-k boundary, a row rejected 4 times, filtered rows
     that want logprobs) take the sort-based path: threshold filters (``top_k_top_p.py``)
     and an inverse-CDF draw. Other devices take that path for every random row, with no
     host sync.
   Each row gets a few uniforms (one per round); seeded rows' come from a hash of (seed,
   token index, round), so seeded requests do not depend on the batch;
7. logprobs: ``log_softmax`` of the logits after steps 1-6 (vLLM 0.6.3 returns these
   "processed" logprobs: temperature and filters included, greedy rows at temperature 1),
   the chosen token's logprob and rank and the top-k per row, only when a row needs them.
   When any row wants logprobs every row is divided by its temperature first.
vLLM 0.6.3 applies logits processors (which carry its logit_bias / allowed_token_ids) before
min_tokens and the penalties; here the penalties come first. The two orders differ only when
a request combines a penalty with a bias or processor.
On CPU the small per-row steps (block search, candidates, acceptance tests, penalties) run in
numpy, whose ops cost ~1 us against several for a torch op; large temporaries live in a
``Workspace`` reused across steps (a fresh multi-MB tensor costs page faults each step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.ops.guided import apply_guided_mask
from pagedllm.sample.ops.logit_bias import apply_logit_bias
from pagedllm.sample.ops.logits_processors import apply_logits_processors
from pagedllm.sample.ops.logprobs import LogprobsTensors, gather_logprobs
from pagedllm.sample.ops.min_tokens import apply_min_tokens
from pagedllm.sample.ops.penalties import apply_penalties
from pagedllm.sample.ops.random_sample import (draw_cpu, inverse_cdf, seeded_uniforms,
                                                uniform_per_row)
from pagedllm.sample.ops.sorting_free import Workspace, sample_candidates, sample_full
from pagedllm.sample.ops.top_k_top_p import apply_min_p, apply_top_k_top_p

NUM_ROUNDS = 4  # rejection rounds of sample_full before a row takes the sorted path


@dataclass
class SamplerOutput:
    sampled_ids: torch.Tensor  # [num_rows] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def apply_filters(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k / top-p, min-p on every row, materialised (in place where possible)."""
    if meta.all_greedy:
        return logits
    logits = logits.div_(meta.temperature[:, None])
    if meta.filters is not None:
        f = meta.filters
        logits = apply_top_k_top_p(logits, f.rows, f.top_k, f.top_p, f.max_top_k)
    if meta.min_p_rows is not None:
        logits = apply_min_p(logits, meta.min_p_rows, meta.min_p)
    return logits


def apply_logits_ops(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 1-4: penalties, bias / allowed ids, min_tokens, logits processors, guided."""
    if meta.penalties is not None:
        logits = apply_penalties(logits, meta.penalties)
    if meta.bias is not None:
        logits = apply_logit_bias(logits, meta.bias)
    if meta.min_tokens_rows is not None:
        logits = apply_min_tokens(logits, meta.min_tokens_rows, meta.min_tokens_ids)
    if meta.processor_rows:
        logits = apply_logits_processors(logits, meta.processor_rows)
    if meta.guided_rows is not None:
        logits = apply_guided_mask(logits, meta.guided_rows, meta.guided_mask)
    return logits


def _uniforms(logits: torch.Tensor, meta: SamplingMetadata, num_cols: int) -> torch.Tensor:
    s = meta.seeded
    return uniform_per_row(logits.shape[0], num_cols, meta.generator,
                           None if s is None else torch.from_numpy(s.rows),
                           None if s is None else s.seeds, None if s is None else s.indices,
                           logits.device)


def _sample_sorted(logits: torch.Tensor, rows: list[int], meta: SamplingMetadata,
                   u: np.ndarray, scaled: bool, write_back: bool,
                   param_rows: list[int] | None = None) -> np.ndarray:
    """The sort-based path for ``rows`` of ``logits`` (CPU): filtered logits materialised (and
    written back for logprobs), then one draw with ``u[rows]``. ``param_rows``: the rows'
    indices in the metadata when ``logits`` holds only some of the batch's rows."""
    vocab = logits.shape[1]
    index = torch.tensor(rows, dtype=torch.long)
    param_rows = rows if param_rows is None else param_rows
    sub = logits.index_select(0, index)
    if not scaled:
        sub = sub.div_(meta.temperature[param_rows][:, None])
    top_k = meta.top_k_host[param_rows]
    top_p, min_p = meta.top_p_host[param_rows], meta.min_p_host[param_rows]
    local = torch.arange(len(rows))
    if (top_k < vocab).any() or (top_p < 1.0).any():
        k = torch.from_numpy(top_k) if (top_k < vocab).any() else None
        p = torch.tensor(top_p, dtype=torch.float32) if (top_p < 1.0).any() else None
        sub = apply_top_k_top_p(sub, local, k, p, int(top_k.max()) if (top_k < vocab).all()
                                else None)
    if (min_p > 0).any():
        keep = min_p > 0
        sub = apply_min_p(sub, local[torch.from_numpy(keep)],
                          torch.tensor(min_p[keep], dtype=torch.float32))
    if write_back:
        logits[index] = sub
    return draw_cpu(sub.softmax(dim=-1), u[rows])[0]


def _rows(t: torch.Tensor, rows: np.ndarray, span: tuple[int, int] | None) -> torch.Tensor:
    """The rows of a path: a view when they are contiguous, else a copy."""
    return t[span[0]:span[1]] if span is not None else t.index_select(0, torch.from_numpy(rows))


def _sample_random_cpu(logits: torch.Tensor, meta: SamplingMetadata, sampled: np.ndarray,
                       scaled: bool, workspace: Workspace | None) -> None:
    """Step 6 on CPU: fills ``sampled`` at the random rows. ``scaled``: the temperature is
    already applied to every row (logprobs are wanted)."""
    # uniforms: one column per round, then one for the sorted path
    u = torch.rand(logits.shape[0], NUM_ROUNDS + 1, generator=meta.generator,
                   dtype=torch.float64).numpy()
    if meta.seeded is not None:
        s = meta.seeded
        u[s.rows] = seeded_uniforms(s.seeds, s.indices, NUM_ROUNDS + 1)
    last = u[:, NUM_ROUNDS]
    if meta.sorted_rows:
        rows = meta.sorted_rows
        sampled[rows] = _sample_sorted(logits, rows, meta, last, scaled, write_back=scaled)
    c = meta.candidates
    if c is not None:
        ids, tied = sample_candidates(_rows(logits, c.rows, c.span), c.top_k, c.max_top_k,
                                      None if scaled else c.inv_temp, c.top_p, c.log_min_p,
                                      u[c.rows, 0])
        if tied.any():  # more than k tokens kept: the sorted path
            ids[tied] = _sample_sorted(logits, c.rows[tied].tolist(), meta, last, scaled,
                                       write_back=False)
        sampled[c.rows] = ids
    f = meta.full
    if f is not None:
        z = _rows(logits, f.rows, f.span)
        if not scaled:  # in place: the rows' view of the logits, or their copy
            for start, end in f.scale_runs:
                z[start:end].mul_(f.inv_temp[start:end, None])
        # without logprobs the logits are not needed after the draw: overwritten in place
        ids, left, filtered = sample_full(z, f.num_top_p, f.top_p, f.min_p_rows, f.log_min_p,
                                          u[f.rows], NUM_ROUNDS, workspace,
                                          overwrite=not scaled)
        if left.size:  # rejected NUM_ROUNDS times: the sorted path on the scaled rows
            ids[left] = _sample_sorted(filtered, left.tolist(), meta, last[f.rows], True,
                                       write_back=False, param_rows=f.rows[left].tolist())
        sampled[f.rows] = ids


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """The first maximum of each row (``max().indices``: like argmax, ~3x faster on CPU for
    wide rows). On CUDA a few wide rows reduce in two stages: torch reduces one row in one
    thread block (27 us for a 128256-entry row on an H200), chunks of it in parallel."""
    rows, vocab = logits.shape
    chunks = _argmax_chunks(vocab) if logits.is_cuda and rows <= 16 else 1
    return chunked_max_indices(logits, chunks) if chunks > 1 else logits.max(dim=-1).indices


def chunked_max_indices(logits: torch.Tensor, chunks: int) -> torch.Tensor:
    """``max(dim=-1).indices`` through per-chunk maxima (chunks divides the row width)."""
    rows, vocab = logits.shape
    best, index = logits.view(rows, chunks, vocab // chunks).max(dim=-1)  # [rows, chunks]
    chunk = best.max(dim=-1, keepdim=True).indices  # the first chunk holding the maximum
    return (chunk * (vocab // chunks) + index.gather(1, chunk)).squeeze(1)


def _argmax_chunks(vocab: int) -> int:
    """The largest divisor of vocab up to 256 whose chunks are >= 256 wide (1: none)."""
    if vocab < 65536:
        return 1
    return next(c for c in range(256, 0, -1) if vocab % c == 0 and vocab // c >= 256)


class Sampler:
    def __init__(self) -> None:
        self.workspace = Workspace()  # scratch memory reused across steps

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [num_rows, vocab] fp32 (modified in place), rows in ``meta.order`` when the
        metadata is permuted -> sampled ids and logprobs, in state order."""
        logits = apply_logits_ops(logits, meta)
        want_logprobs = meta.max_num_logprobs >= 0
        if meta.all_greedy:
            sampled = greedy_ids(logits)
        elif logits.device.type == "cpu":
            ids = np.empty(logits.shape[0], dtype=np.int64)
            if meta.greedy_rows is not None:
                greedy = _rows(logits, meta.greedy_rows, meta.greedy_span)
                ids[meta.greedy_rows] = greedy.max(dim=-1).indices.numpy()
            if want_logprobs:  # logprobs are of the scaled logits: scale every row once
                logits = logits.div_(meta.temperature[:, None])
            _sample_random_cpu(logits, meta, ids, want_logprobs, self.workspace)
            sampled = torch.from_numpy(ids)
        else:
            greedy = greedy_ids(logits)
            logits = apply_filters(logits, meta)
            u = _uniforms(logits, meta, 1)[:, 0]
            sampled = torch.where(meta.is_greedy, greedy,
                                  inverse_cdf(logits.softmax(dim=-1), u)[0])
        logprobs = None
        if want_logprobs:
            logprobs = gather_logprobs(logits.log_softmax(dim=-1), sampled,
                                       meta.max_num_logprobs)
        if meta.inverse is not None:  # back to state order
            sampled = sampled[meta.inverse]
            if logprobs is not None:
                logprobs = LogprobsTensors(*(t[meta.inverse] for t in (
                    logprobs.token_ids, logprobs.logprobs, logprobs.ranks, logprobs.topk_ids,
                    logprobs.topk_logprobs)))
        return SamplerOutput(sampled, logprobs)
