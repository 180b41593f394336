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
from pagedllm.sample.metadata import build_filter_metadata
from pagedllm.sample.ops.logprobs import gather_logprobs
from pagedllm.sample.ops.random_sample import inverse_cdf, seed_array, seeded_uniforms
from pagedllm.sample.sampler import apply_filters, greedy_ids


@dataclass(frozen=True)
class SpecSettings:
    """What the scheduler needs of the speculative flags."""
    num_tokens: int  # --num-speculative-tokens
    ngram_max: int  # --ngram-prompt-lookup-max
    ngram_min: int = 1  # --ngram-prompt-lookup-min
    max_model_len: int | None = None  # --speculative-max-model-len
    disable_by_batch_size: int | None = None  # --speculative-disable-by-batch-size
    typical: tuple[float, float] | None = None  # typical acceptance: (threshold, alpha)
    with_logprobs: bool = False  # --disable-logprobs-during-spec-decoding False

    @classmethod
    def from_config(cls, sc) -> "SpecSettings | None":
        """From a ``SpeculativeConfig``; None when speculation is off."""
        if sc.speculative_model is None:
            return None
        typical = None
        if sc.spec_decoding_acceptance_method == "typical_acceptance_sampler":
            typical = (_or(sc.typical_acceptance_sampler_posterior_threshold, 0.09),
                       _or(sc.typical_acceptance_sampler_posterior_alpha, 0.3))
        return cls(sc.num_speculative_tokens, sc.ngram_prompt_lookup_max,
                   sc.ngram_prompt_lookup_min or 1, sc.speculative_max_model_len,
                   sc.speculative_disable_by_batch_size, typical,
                   sc.disable_logprobs_during_spec_decoding is False)


def _or(value, default):
    return default if value is None else value


def propose_ngram(token_ids, num_tokens: int, max_n: int, min_n: int,
                  total: int | None = None) -> list[int]:
    """Up to ``num_tokens`` draft tokens: what followed the first earlier occurrence of the
    sequence's last n tokens (longest n first); [] when nothing matches. ``token_ids``: a
    list, or a numpy array whose first ``total`` entries are the sequence."""
    ids = token_ids if isinstance(token_ids, np.ndarray) else np.asarray(token_ids, np.int64)
    total = len(ids) if total is None else total
    if num_tokens <= 0 or total < 2:
        return []
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        tail = ids[total - n:total]
        # starts of the windows of ids[:total - 1]: 0 .. total - 1 - n (the tail excluded)
        starts = np.flatnonzero(ids[:total - n] == tail[0])
        for j in range(1, n):
            starts = starts[ids[starts + j] == tail[j]]
        if starts.size:
            start = int(starts[0]) + n
            return ids[start:min(start + num_tokens, total)].tolist()
    return []


class NgramProposer:
    """``propose_ngram`` over each request's tokens kept in a growing numpy buffer, so a
    step converts only the tokens added since the last one (a 32K-token list costs ~1 ms
    to convert; the search itself is a few vectorised compares)."""

    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n, self.min_n = max_n, min_n
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}  # req_id -> (buffer, length)

    def propose(self, req_id: str, token_ids: list[int], num_tokens: int) -> list[int]:
        buf, length = self._buffers.get(req_id, (None, 0))
        total = len(token_ids)
        if buf is None or total < length or total > len(buf):  # new, shrunk or full
            buf = np.empty(max(64, 2 * total), dtype=np.int64)
            length = 0
        buf[length:total] = token_ids[length:total]
        self._buffers[req_id] = (buf, total)
        return propose_ngram(buf, num_tokens, self.max_n, self.min_n, total)

    def forget(self, req_id: str) -> None:
        self._buffers.pop(req_id, None)


def needs_logprobs(params) -> bool:
    """The request returns logprobs, or ranks best_of candidates by them."""
    return params.logprobs is not None or params.best_of > params.n


def can_speculate(request, with_logprobs: bool = False) -> bool:
    """False for requests whose sampling needs per-token host state
    (``Request.samples_without_host_state``) or logit_bias / allowed_token_ids, and, unless
    ``with_logprobs`` (--disable-logprobs-during-spec-decoding False), requests that need
    logprobs. They decode one token per step as usual."""
    p = request.sampling_params
    return (request.samples_without_host_state() and not p.logit_bias
            and not p.allowed_token_ids and (with_logprobs or not needs_logprobs(p)))


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
