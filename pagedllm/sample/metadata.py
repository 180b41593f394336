"""Per-step sampling parameters as tensors, one row per request that samples this step.

``build_sampling_metadata`` is the only Python loop over requests: it gathers each row's
parameters into lists once per step and turns them into tensors. Every optional op gets the
indices of the rows that use it (``*_rows``) or ``None`` when no row does, so a batch of plain
requests pays nothing for penalties, bias, min-p or logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pagedllm.sample.ops.logit_bias import build_bias
from pagedllm.sampling_params import SamplingParams

_EPS = 1e-5


@dataclass
class PenaltyInputs:
    rows: torch.Tensor  # [num_penalized]
    prompt_ids: torch.Tensor  # [num_penalized, max_prompt_len] padded with vocab_size
    output_ids: torch.Tensor  # [num_penalized, max_output_len] padded with vocab_size
    presence: torch.Tensor  # [num_penalized]
    frequency: torch.Tensor  # [num_penalized]
    repetition: torch.Tensor  # [num_penalized]


@dataclass
class FilterInputs:
    rows: torch.Tensor  # [num_filtered] rows using top-k or top-p
    top_k: torch.Tensor | None  # [num_filtered] vocab where off; None if no row sets it
    top_p: torch.Tensor | None  # [num_filtered] 1.0 where off; None if no row sets it
    max_top_k: int | None  # largest k when every filtered row sets top-k


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_rows] 1.0 where greedy
    is_greedy: torch.Tensor  # [num_rows] bool
    all_greedy: bool
    # (row, seed, index of the token being sampled) for seeded random rows
    seeded_rows: list[tuple[int, int, int]]
    generator: torch.Generator | None  # engine-wide generator (--seed) for unseeded rows
    filters: FilterInputs | None = None
    min_p_rows: torch.Tensor | None = None  # [num_min_p]
    min_p: torch.Tensor | None = None  # [num_min_p]
    penalties: PenaltyInputs | None = None
    bias_rows: torch.Tensor | None = None  # [num_biased]
    bias: torch.Tensor | None = None  # [num_biased, vocab] logit_bias + allowed-ids mask
    min_tokens_rows: torch.Tensor | None = None  # [num_pairs]
    min_tokens_ids: torch.Tensor | None = None  # [num_pairs] stop ids masked on those rows
    # (row, processors, prompt ids, output ids) for rows with logits processors
    processor_rows: list[tuple[int, list[Callable], list[int], list[int]]] = field(
        default_factory=list)
    guided_rows: torch.Tensor | None = None  # [num_guided] rows constrained by a grammar
    guided_mask: torch.Tensor | None = None  # [num_guided, vocab] fp32: 0 allowed, -inf not
    num_logprobs: list[int] = field(default_factory=list)  # per row; -1: not requested
    max_num_logprobs: int = -1  # -1: no row needs logprobs (not even the sampled token's)


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    array = np.full((len(seqs), max(1, max(len(s) for s in seqs))), pad, dtype=np.int64)
    for i, seq in enumerate(seqs):
        array[i, :len(seq)] = seq
    return torch.from_numpy(array).to(device)


def _num_logprobs(p: SamplingParams) -> int:
    """Top alternatives a row needs: 0 when only the sampled token's logprob is needed
    (best_of ranking), -1 when nothing is needed."""
    if p.logprobs is not None:
        return p.logprobs
    return 0 if p.best_of > p.n else -1


def build_sampling_metadata(states: list, vocab_size: int, generator: torch.Generator | None,
                            device: torch.device) -> SamplingMetadata:
    """states: the runner's per-request states (``sampling_params``, ``token_ids``,
    ``num_prompt_tokens``, ``num_output_tokens``), one per sampling row."""
    temps, greedy, seeded, num_logprobs = [], [], [], []
    filt_rows, top_ks, top_ps, min_p_rows, min_ps = [], [], [], [], []
    pen_rows, bias_allowed, bias_values, bias_rows = [], [], [], []
    min_tok_rows, min_tok_ids, processors = [], [], []
    for row, s in enumerate(states):
        p: SamplingParams = s.sampling_params
        is_greedy = p.temperature < _EPS
        greedy.append(is_greedy)
        temps.append(1.0 if is_greedy else p.temperature)
        num_logprobs.append(_num_logprobs(p))
        if not is_greedy:
            if p.seed is not None:
                seeded.append((row, p.seed, s.num_output_tokens))
            if 0 < p.top_k < vocab_size or p.top_p < 1.0:
                filt_rows.append(row)
                top_ks.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
                top_ps.append(p.top_p)
            if p.min_p > _EPS:
                min_p_rows.append(row)
                min_ps.append(p.min_p)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or \
                p.repetition_penalty != 1.0:
            pen_rows.append(row)
        if p.logit_bias or p.allowed_token_ids is not None:
            local = len(bias_rows)
            bias_rows.append(row)
            if p.allowed_token_ids is not None:
                bias_allowed.append((local, p.allowed_token_ids))
            if p.logit_bias:
                bias_values.append((local, p.logit_bias))
        if s.num_output_tokens < p.min_tokens and p.all_stop_token_ids:
            min_tok_rows.extend([row] * len(p.all_stop_token_ids))
            min_tok_ids.extend(p.all_stop_token_ids)
        if p.logits_processors:
            prompt_ids = s.token_ids[:s.num_prompt_tokens]
            processors.append((row, p.logits_processors, prompt_ids,
                               s.token_ids[s.num_prompt_tokens:]))
    meta = SamplingMetadata(
        temperature=torch.tensor(temps, dtype=torch.float32, device=device),
        is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy), seeded_rows=seeded, generator=generator,
        processor_rows=processors, num_logprobs=num_logprobs,
        max_num_logprobs=max(num_logprobs, default=-1))
    ftensor = lambda v, dt=torch.float32: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    if filt_rows:
        use_k = any(k < vocab_size for k in top_ks)
        meta.filters = FilterInputs(
            ftensor(filt_rows, torch.long), ftensor(top_ks, torch.long) if use_k else None,
            ftensor(top_ps) if any(v < 1.0 for v in top_ps) else None,
            max(top_ks) if all(k < vocab_size for k in top_ks) else None)
    if min_p_rows:
        meta.min_p_rows, meta.min_p = ftensor(min_p_rows, torch.long), ftensor(min_ps)
    if pen_rows:
        meta.penalties = _penalty_inputs(states, pen_rows, vocab_size, device)
    if bias_rows:
        meta.bias_rows = ftensor(bias_rows, torch.long)
        meta.bias = build_bias(len(bias_rows), vocab_size, bias_allowed, bias_values, device)
    if min_tok_rows:
        meta.min_tokens_rows = ftensor(min_tok_rows, torch.long)
        meta.min_tokens_ids = ftensor(min_tok_ids, torch.long)
    return meta


def _penalty_inputs(states: list, rows: list[int], vocab_size: int,
                    device: torch.device) -> PenaltyInputs:
    chosen = [states[r] for r in rows]
    params = [s.sampling_params for s in chosen]
    return PenaltyInputs(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        prompt_ids=_padded([s.token_ids[:s.num_prompt_tokens] for s in chosen], vocab_size,
                           device),
        output_ids=_padded([s.token_ids[s.num_prompt_tokens:] for s in chosen], vocab_size,
                           device),
        presence=torch.tensor([p.presence_penalty for p in params], device=device),
        frequency=torch.tensor([p.frequency_penalty for p in params], device=device),
        repetition=torch.tensor([p.repetition_penalty for p in params], device=device))


def build_filter_metadata(params: list[SamplingParams], vocab_size: int,
                          device: torch.device) -> SamplingMetadata:
    """Temperature, top-k / top-p and min-p only, one row per params entry: the processing
    vLLM 0.6.3 gives prompt-logprob rows (no penalties, bias, min_tokens or processors)."""
    states = [_FilterOnly(p) for p in params]
    meta = build_sampling_metadata(states, vocab_size, None, device)
    meta.max_num_logprobs = -1
    return meta


@dataclass
class _FilterOnly:
    sampling_params: SamplingParams
    token_ids: tuple = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def __post_init__(self) -> None:
        p = self.sampling_params
        self.sampling_params = SamplingParams(temperature=p.temperature, top_k=p.top_k,
                                              top_p=p.top_p, min_p=p.min_p)
