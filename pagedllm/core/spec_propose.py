"""Speculative decoding, the control plane's half: the prompt-lookup proposer the scheduler
calls, the settings, and which requests may speculate. Pure Python and numpy (no torch); the
verifier that runs after the forward is in ``pagedllm/spec_decode.py``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
