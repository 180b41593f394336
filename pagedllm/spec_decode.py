"""Speculative decoding with prompt lookup (``--speculative-model [ngram]``).

Proposer (the scheduler calls it for each decoding request): the last ``n`` tokens of the
request (prompt + output), for ``n`` from ``--ngram-prompt-lookup-max`` down to ``-min``, are
searched for earlier in the same sequence; the first earlier occurrence's next tokens (up to
``--num-speculative-tokens``) are the draft. No match: the request decodes normally.

Verifier (the runner calls it after one forward over [last token, draft...] of each
speculating request, which gives target logits at every draft position and one past it):
- greedy rows accept the longest draft prefix that equals the argmax at each position, then
  add the argmax where the first mismatch (or the end) is: the same tokens as plain greedy
  decoding;
- random rows use the rejection sampler: the draft is deterministic (q = 1 on the drafted
  token), so draft token ``d`` at position j is accepted with probability p_j(d) of the
  target distribution after temperature / top-k / top-p / min-p; the first rejected position
  samples from p_j with ``d`` removed (renormalised), and a fully accepted draft adds a token
  sampled from the position after it. The output has the target model's distribution.
- or, with ``--spec-decoding-acceptance-method typical_acceptance_sampler``, random rows keep
  the longest draft prefix whose tokens are "typical": p_j(d) > min(threshold,
  alpha * exp(-H(p_j))) (``--typical-acceptance-sampler-posterior-threshold`` / ``-alpha``,
  defaults 0.09 and 0.3); the first atypical position takes p_j's most likely token, and a
  fully accepted draft adds a token sampled from the position after it. Faster to accept on
  flat distributions, but not the target distribution (lossy, as in vLLM); greedy rows keep
  the exact rule above.
Seeded requests draw their uniforms from (seed, index of the token, draw) as the sampler
does, so they are reproducible (their tokens differ from the run without speculation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.core.scheduler_output import TokenLogprobs
from pagedllm.core.spec_propose import (NgramProposer, SpecSettings,  # noqa: F401 (re-export)
                                        can_speculate, needs_logprobs, propose_ngram)
from pagedllm.sample.metadata import build_filter_metadata
from pagedllm.sample.ops.logprobs import gather_logprobs
from pagedllm.sample.ops.random_sample import inverse_cdf, seed_array, seeded_uniforms
from pagedllm.sample.sampler import apply_filters, greedy_ids


@dataclass
class SpecRows:
    """One speculating request of the step: its draft and where its logits rows start."""
    state: object  # the runner's CachedRequestState
    draft: list[int]
    row: int  # first of len(draft) + 1 rows in the verifier's logits


def verify(logits: torch.Tensor, specs: list[SpecRows], generator: torch.Generator,
           vocab_size: int, typical: tuple[float, float] | None = None
           ) -> tuple[list[list[int]], dict[str, list[TokenLogprobs]]]:
    """logits [sum(len(draft) + 1), vocab] fp32 target logits (the rows of each request in
    ``specs`` order) -> per request the accepted draft tokens plus one more, and for the
    requests that need them the logprobs of those tokens (as the sampler computes them: of
    the logits after temperature and filters; greedy rows at temperature 1). ``typical``:
    (threshold, alpha) of the typical acceptance sampler, else the rejection sampler."""
    params = [s.state.sampling_params for s in specs for _ in range(len(s.draft) + 1)]
    argmax = greedy_ids(logits).tolist()
    processed = None
    if not all(_greedy(p) for p in params) or any(needs_logprobs(p) for p in params):
        meta = build_filter_metadata(params, vocab_size, logits.device)
        processed = apply_filters(logits.clone(), meta)
    probs = processed.softmax(dim=-1) if processed is not None else None
    tokens = _accept(specs, argmax, probs, generator, typical)
    logprobs = {}
    for spec, toks in zip(specs, tokens):
        p = spec.state.sampling_params
        if needs_logprobs(p):
            rows = processed[spec.row:spec.row + len(toks)].log_softmax(dim=-1)
            logprobs[spec.state.req_id] = _token_logprobs(rows, toks, p.logprobs or 0)
    return tokens, logprobs


def _token_logprobs(rows: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprobs]:
    t = gather_logprobs(rows, torch.tensor(tokens, dtype=torch.long, device=rows.device), k)
    return [TokenLogprobs(tok, lp, rank, ids, lps) for tok, lp, rank, ids, lps in zip(
        tokens, t.logprobs.tolist(), t.ranks.tolist(), t.topk_ids.tolist(),
        t.topk_logprobs.tolist())]


def _accept(specs: list[SpecRows], argmax: list[int], probs: torch.Tensor | None,
            generator: torch.Generator, typical: tuple[float, float] | None) -> list[list[int]]:
    out = []
    for spec in specs:
        k, r = len(spec.draft), spec.row
        if _greedy(spec.state.sampling_params):
            a = 0
            while a < k and argmax[r + a] == spec.draft[a]:
                a += 1
            out.append(spec.draft[:a] + [argmax[r + a]])
            continue
        u = _uniforms(spec, generator, 2 * k + 1)
        p = probs[r:r + k + 1]
        drafted = p[torch.arange(k), torch.tensor(spec.draft, dtype=torch.long,
                                                  device=p.device)].tolist() if k else []
        if typical is not None:
            out.append(_typical(p, spec.draft, drafted, typical, u[-1]))
            continue
        a = 0
        while a < k and u[a] < drafted[a]:
            a += 1
        w = p[a:a + 1].clone()
        if a < k:  # rejected: the residual distribution without the drafted token
            w[0, spec.draft[a]] = 0.0
        token = inverse_cdf(w, torch.tensor([u[k + a]], dtype=torch.float64,
                                            device=w.device))[0]
        out.append(spec.draft[:a] + [int(token[0])])
    return out


def _typical(p: torch.Tensor, draft: list[int], drafted: list[float],
             typical: tuple[float, float], u: float) -> list[int]:
    """Typical acceptance of one request's draft: p [k + 1, vocab] target probabilities."""
    threshold, alpha = typical
    k = len(draft)
    logs = torch.where(p > 0, p.log(), torch.zeros_like(p))
    entropy = -(p * logs).sum(-1)  # [k + 1]
    bound = torch.clamp(alpha * torch.exp(-entropy), max=threshold).tolist()
    a = 0
    while a < k and drafted[a] > bound[a]:
        a += 1
    if a < k:  # the first atypical position: its most likely token
        return draft[:a] + [int(p[a].argmax())]
    token = inverse_cdf(p[k:].contiguous(), torch.tensor([u], dtype=torch.float64,
                                                         device=p.device))[0]
    return draft + [int(token[0])]


def _greedy(params) -> bool:
    return params.temperature < 1e-5  # the sampler's greedy threshold


def _uniforms(spec: SpecRows, generator: torch.Generator, count: int) -> list[float]:
    """``count`` uniforms for one request's verification: seeded requests from (seed, index
    of the first token this step, draw number), others from the engine generator."""
    seed = spec.state.sampling_params.seed
    if seed is None:
        return torch.rand(count, generator=generator, dtype=torch.float64,
                          device=generator.device).tolist()
    index = np.array([spec.state.num_output_tokens], dtype=np.int64)
    return seeded_uniforms(seed_array([seed]), index, count)[0].tolist()
