"""Per-step sampling parameters as tensors, one row per request that samples this step.

``MetadataBuilder.build`` is the only Python loop over requests. Everything that depends
only on the requests' ``SamplingParams`` and their order in the batch (temperatures, which
sampling path each row takes, filter values, penalty weights, logit bias, allowed-ids masks,
prompt ids for the repetition penalty) is built once and reused for as long as the runner
hands over the same request states in the same order (every decode step of a steady batch);
each step then only reads what moves: the seeded rows' token index, the penalised rows' new
output ids (added to a ``PenaltyHistory``), min_tokens and logits-processor inputs.

Every optional op gets the indices of the rows that use it (``*_rows``) or ``None`` when no
row does, so a batch of plain requests pays nothing for penalties, bias, min-p or logprobs.
Random rows are split between the sampler's paths (``sampler.py``): ``candidates`` (top-k
with k <= ``CANDIDATE_MAX_K``), ``full`` (no top-k: whole-vocabulary rejection sampling) and
``sorted_rows`` (the sort-based path: a larger top-k, or filters on a row that needs
logprobs of the filtered distribution).

With ``permute=True`` (the runner's builder) the rows are put in path order (greedy,
candidates, full rows: top-p, top-p and min-p, min-p, plain, then sorted; within a path rows
at temperature 1 last, as they need no scaling) and ``SamplingMetadata.order`` holds the
state index of each row: the runner computes the logits in that order (it gathers the hidden
states anyway), so each path works on a contiguous slice of the logits instead of copying its
rows out. Row indices in the metadata are then positions in that order; ``num_logprobs``
stays in state order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from pagedllm.sample.ops.logit_bias import BiasInputs, build_bias
from pagedllm.sample.ops.penalties import PenaltyHistory, PenaltyInputs
from pagedllm.sample.ops.random_sample import seed_array
from pagedllm.sampling_params import SamplingParams
from pagedllm.tensors import to_device

_EPS = 1e-5
CANDIDATE_MAX_K = 256  # rows with top_k <= this sample among their top-k candidates
# a row's path, in the order of a permuted batch
_GREEDY, _CANDIDATES, _TOP_P, _TOP_P_MIN_P, _MIN_P, _PLAIN, _SORTED = range(7)


@dataclass
class FilterInputs:
    rows: torch.Tensor  # [num_filtered] rows using top-k or top-p
    top_k: torch.Tensor | None  # [num_filtered] vocab where off; None if no row sets it
    top_p: torch.Tensor | None  # [num_filtered] 1.0 where off; None if no row sets it
    max_top_k: int | None  # largest k when every filtered row sets top-k


@dataclass
class CandidateRows:
    """Random rows with 1 <= top_k <= CANDIDATE_MAX_K (``sorting_free.sample_candidates``).
    The CPU path's parameters are host (numpy) arrays."""
    rows: np.ndarray  # [n]
    inv_temp: np.ndarray  # [n] float32
    top_k: np.ndarray  # [n] int64
    max_top_k: int
    top_p: np.ndarray | None  # [n] 1.0 where off; None if no row sets it
    log_min_p: np.ndarray | None  # [n] float32, -inf where off; None if no row sets it
    span: tuple[int, int] | None  # (start, end) when rows == range(start, end)


@dataclass
class FullRows:
    """Random rows without top-k (``sorting_free.sample_full``), in this order: top-p only,
    top-p and min-p, min-p only, no filter."""
    rows: np.ndarray  # [n]
    inv_temp: torch.Tensor  # [n]
    num_top_p: int  # rows [0, num_top_p) use top-p
    top_p: np.ndarray | None  # [num_top_p] float64
    min_p_rows: tuple[int, int] | None  # rows [a, b) use min-p
    log_min_p: np.ndarray | None  # [b - a] float32
    span: tuple[int, int] | None  # (start, end) when rows == range(start, end)
    scale_runs: list[tuple[int, int]]  # runs of rows [s, e) whose temperature is not 1


@dataclass
class SeededRows:
    rows: np.ndarray  # [n] rows of seeded random requests
    seeds: np.ndarray  # [n] uint64
    indices: np.ndarray  # [n] int64 index of the token being sampled (output tokens so far)


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [num_rows] 1.0 where greedy
    is_greedy: torch.Tensor  # [num_rows] bool
    all_greedy: bool
    seeded: SeededRows | None
    generator: torch.Generator | None  # engine-wide generator (--seed) for unseeded rows
    greedy_rows: np.ndarray | None = None  # [num_greedy], None when none or all greedy
    greedy_span: tuple[int, int] | None = None  # (start, end) when greedy rows are a range
    # state index of each row when the rows are permuted (see above), its inverse; or None
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    # every filtered random row, for the sort-based ops (``apply_filters``)
    filters: FilterInputs | None = None
    min_p_rows: torch.Tensor | None = None  # [num_min_p]
    min_p: torch.Tensor | None = None  # [num_min_p]
    # the CPU sampler's split of the random rows
    candidates: CandidateRows | None = None
    full: FullRows | None = None
    sorted_rows: list[int] = field(default_factory=list)
    # per row (all rows), host side: the filters of any row the sorted path takes
    top_k_host: np.ndarray | None = None  # vocab where off
    top_p_host: np.ndarray | None = None  # 1.0 where off
    min_p_host: np.ndarray | None = None  # 0.0 where off
    penalties: PenaltyInputs | None = None
    bias: BiasInputs | None = None
    min_tokens_rows: torch.Tensor | None = None  # [num_pairs]
    min_tokens_ids: torch.Tensor | None = None  # [num_pairs] stop ids masked on those rows
    # (row, processors, prompt ids, output ids) for rows with logits processors
    processor_rows: list[tuple[int, list[Callable], list[int], list[int]]] = field(
        default_factory=list)
    guided_rows: torch.Tensor | None = None  # [num_guided] rows constrained by a grammar
    guided_mask: torch.Tensor | None = None  # [num_guided, vocab] fp32: 0 allowed, -inf not
    num_logprobs: list[int] = field(default_factory=list)  # per row; -1: not requested
    max_num_logprobs: int = -1  # -1: no row needs logprobs (not even the sampled token's)


def _num_logprobs(p: SamplingParams) -> int:
    """Top alternatives a row needs: 0 when only the sampled token's logprob is needed
    (best_of ranking), -1 when nothing is needed."""
    if p.logprobs is not None:
        return p.logprobs
    return 0 if p.best_of > p.n else -1


def _span(rows: list[int]) -> tuple[int, int] | None:
    return (rows[0], rows[-1] + 1) if rows and rows == list(range(rows[0], rows[-1] + 1)) \
        else None


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [s, e) of True."""
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


class _Plan:
    """The parts of the metadata fixed by the batch's requests and their order."""

    def __init__(self, states: list, vocab_size: int, generator: torch.Generator | None,
                 device: torch.device, permute: bool = False) -> None:
        self.states = list(states)
        self.vocab_size, self.device = vocab_size, device
        num_logprobs = [_num_logprobs(s.sampling_params) for s in states]
        paths = [self._path(s.sampling_params, n) for s, n in zip(states, num_logprobs)]
        order = self._order(states, paths) if permute else None
        if order is not None:
            states, paths = [states[i] for i in order], [paths[i] for i in order]
        params: list[SamplingParams] = [s.sampling_params for s in states]
        greedy = [path == _GREEDY for path in paths]
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_k = np.array([p.top_k if not g and 0 < p.top_k < vocab_size else vocab_size
                          for g, p in zip(greedy, params)], dtype=np.int64)
        top_p = np.array([1.0 if g else p.top_p for g, p in zip(greedy, params)])
        min_p = np.array([p.min_p if not g and p.min_p > _EPS else 0.0
                          for g, p in zip(greedy, params)])
        meta = SamplingMetadata(
            temperature=self._tensor(temps), is_greedy=self._tensor(greedy, torch.bool),
            all_greedy=all(greedy), seeded=None, generator=generator,
            num_logprobs=num_logprobs, max_num_logprobs=max(num_logprobs, default=-1),
            top_k_host=top_k, top_p_host=top_p, min_p_host=min_p)
        self._set_order_and_filters(meta, order, greedy, top_k, top_p, min_p)
        self._split_paths(meta, paths, temps, top_k, top_p, min_p)
        self._set_seeds_and_penalties(meta, states, params, greedy)
        allowed = [(i, p.allowed_token_ids) for i, p in enumerate(params)
                   if p.allowed_token_ids is not None]
        biases = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
        if allowed or biases:
            meta.bias = build_bias(vocab_size, allowed, biases, device)
        self.min_tokens = [(i, s) for i, s in enumerate(states)
                           if s.sampling_params.min_tokens > 0
                           and s.sampling_params.all_stop_token_ids]
        self.processors = [(i, s) for i, s in enumerate(states)
                           if s.sampling_params.logits_processors]
        self.meta = meta

    def _tensor(self, values, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    @staticmethod
    def _order(states: list, paths: list[int]) -> list[int] | None:
        """Rows grouped by sampling path (stable; rows at temperature 1 last within their
        path: they need no scaling), or None where the batch is in that order already."""
        order = sorted(range(len(states)), key=lambda i: (
            paths[i], states[i].sampling_params.temperature == 1.0))
        return None if order == list(range(len(states))) else order

    def _set_order_and_filters(self, meta: SamplingMetadata, order: list[int] | None,
                               greedy: list[bool], top_k: np.ndarray, top_p: np.ndarray,
                               min_p: np.ndarray) -> None:
        """The permutation, the greedy rows of a mixed batch, and the sort-based view of the
        filters (apply_filters, non-CPU devices)."""
        n, tensor = len(greedy), self._tensor
        if order is not None:
            inverse = [0] * n
            for pos, i in enumerate(order):
                inverse[i] = pos
            meta.order, meta.inverse = tensor(order, torch.long), tensor(inverse, torch.long)
        if any(greedy) and not meta.all_greedy:
            rows = [i for i in range(n) if greedy[i]]
            meta.greedy_rows, meta.greedy_span = np.array(rows, dtype=np.int64), _span(rows)
        filt = [i for i in range(n) if top_k[i] < self.vocab_size or top_p[i] < 1.0]
        if filt:
            use_k = top_k[filt] < self.vocab_size
            meta.filters = FilterInputs(
                tensor(filt, torch.long), tensor(top_k[filt], torch.long) if use_k.any() else None,
                tensor(top_p[filt]) if (top_p[filt] < 1.0).any() else None,
                int(top_k[filt].max()) if use_k.all() else None)
        mp_rows = [i for i in range(n) if min_p[i] > 0]
        if mp_rows:
            meta.min_p_rows, meta.min_p = tensor(mp_rows, torch.long), tensor(min_p[mp_rows])

    def _set_seeds_and_penalties(self, meta: SamplingMetadata, states: list,
                                 params: list[SamplingParams], greedy: list[bool]) -> None:
        """Per-request generators of the seeded rows; the penalised rows' token history."""
        seeded = [i for i in range(len(params)) if not greedy[i] and params[i].seed is not None]
        self.seeded_states = [states[i] for i in seeded]
        if seeded:
            meta.seeded = SeededRows(np.array(seeded, dtype=np.int64),
                                     seed_array([params[i].seed for i in seeded]),
                                     np.zeros(len(seeded), dtype=np.int64))
        pen = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or
               p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0]
        self.penalty_states, self.penalty_seen, self.history = [], [], None
        if pen:
            chosen = [states[i] for i in pen]
            self.penalty_states = chosen
            self.penalty_seen = [0] * len(chosen)  # output tokens already in the history
            self.history = PenaltyHistory(
                [s.token_ids[:s.num_prompt_tokens] for s in chosen], np.array(pen),
                np.array([params[i].presence_penalty for i in pen]),
                np.array([params[i].frequency_penalty for i in pen]),
                np.array([params[i].repetition_penalty for i in pen]), self.vocab_size)

    def _path(self, p: SamplingParams, num_logprobs: int) -> int:
        if p.temperature < _EPS:
            return _GREEDY
        has_k = 0 < p.top_k < self.vocab_size
        has_p, has_min_p = p.top_p < 1.0, p.min_p > _EPS
        if (num_logprobs >= 0 and (has_k or has_p or has_min_p)) or \
                (has_k and p.top_k > CANDIDATE_MAX_K):
            return _SORTED
        if has_k:
            return _CANDIDATES
        if has_p:
            return _TOP_P_MIN_P if has_min_p else _TOP_P
        return _MIN_P if has_min_p else _PLAIN

    def _split_paths(self, meta: SamplingMetadata, paths: list[int], temps: list[float],
                     top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> None:
        tensor = lambda v, dt=torch.float32: to_device(v, dt, self.device)  # noqa
        rows = {path: [i for i, q in enumerate(paths) if q == path]
                for path in (_CANDIDATES, _TOP_P, _TOP_P_MIN_P, _MIN_P, _PLAIN, _SORTED)}
        meta.sorted_rows = rows[_SORTED]
        inv_temp = [1.0 / t for t in temps]
        with np.errstate(divide="ignore"):
            log_min_p = np.log(min_p)  # -inf where off
        cand = rows[_CANDIDATES]
        if cand:
            meta.candidates = CandidateRows(
                np.array(cand, dtype=np.int64),
                np.array([inv_temp[i] for i in cand], dtype=np.float32), top_k[cand],
                int(top_k[cand].max()), top_p[cand] if (top_p[cand] < 1.0).any() else None,
                log_min_p[cand].astype(np.float32) if (min_p[cand] > 0).any() else None,
                _span(cand))
        with_p = rows[_TOP_P] + rows[_TOP_P_MIN_P]
        with_min_p = rows[_TOP_P_MIN_P] + rows[_MIN_P]
        full = with_p + rows[_MIN_P] + rows[_PLAIN]
        if full:
            meta.full = FullRows(
                np.array(full, dtype=np.int64), tensor([inv_temp[i] for i in full]),
                len(with_p), top_p[with_p] if with_p else None,
                (len(rows[_TOP_P]), len(with_p) + len(rows[_MIN_P])) if with_min_p else None,
                log_min_p[with_min_p].astype(np.float32) if with_min_p else None, _span(full),
                _runs([temps[i] != 1.0 for i in full]))

    def step(self) -> SamplingMetadata:
        """This step's metadata: the fixed parts plus what moved since the last step."""
        meta = replace(self.meta)
        if meta.seeded is not None:
            meta.seeded = replace(meta.seeded, indices=np.array(
                [s.num_output_tokens for s in self.seeded_states], dtype=np.int64))
        if self.history is not None:
            local, tokens = [], []
            for i, s in enumerate(self.penalty_states):
                new = s.token_ids[s.num_prompt_tokens + self.penalty_seen[i]:]
                if new:
                    local += [i] * len(new)
                    tokens += new
                    self.penalty_seen[i] += len(new)
            if tokens:
                self.history.add_outputs(np.array(local), np.array(tokens))
            meta.penalties = self.history.inputs()
        rows, ids = [], []
        for row, s in self.min_tokens:
            if s.num_output_tokens < s.sampling_params.min_tokens:
                stop = s.sampling_params.all_stop_token_ids
                rows.extend([row] * len(stop))
                ids.extend(stop)
        if rows:
            meta.min_tokens_rows = to_device(rows, torch.long, self.device)
            meta.min_tokens_ids = to_device(ids, torch.long, self.device)
        meta.processor_rows = [(row, s.sampling_params.logits_processors,
                                s.token_ids[:s.num_prompt_tokens],
                                s.token_ids[s.num_prompt_tokens:]) for row, s in self.processors]
        return meta


class MetadataBuilder:
    """Builds each step's ``SamplingMetadata``; keeps the fixed parts while the runner passes
    the same state objects in the same order (a new state object, e.g. after a recompute
    preemption, or any change of the batch rebuilds them)."""

    def __init__(self, vocab_size: int, generator: torch.Generator | None,
                 device: torch.device, permute: bool = False) -> None:
        self.vocab_size, self.generator, self.device = vocab_size, generator, device
        self.permute = permute
        self._plan: _Plan | None = None

    def build(self, states: list) -> SamplingMetadata:
        plan = self._plan
        if plan is None or len(plan.states) != len(states) or \
                any(a is not b for a, b in zip(plan.states, states)):
            plan = self._plan = _Plan(states, self.vocab_size, self.generator, self.device,
                                      self.permute)
        return plan.step()


def build_sampling_metadata(states: list, vocab_size: int, generator: torch.Generator | None,
                            device: torch.device) -> SamplingMetadata:
    """states: the runner's per-request states (``sampling_params``, ``token_ids``,
    ``num_prompt_tokens``, ``num_output_tokens``), one per sampling row. Uncached: the
    runner uses a ``MetadataBuilder``."""
    return _Plan(states, vocab_size, generator, device).step()


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
