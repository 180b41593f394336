"""Sampling for one step of the model runner: logits -> sampled ids and logprobs on the host.

Owned by ``ModelRunner``. For the rows that sample (last scheduled token of a request that
has caught up with its known tokens) it builds ``SamplingMetadata`` once and runs the
``Sampler``. For requests asking for ``prompt_logprobs`` it also computes logits at the
prompt positions scheduled this step (any chunk of a chunked prefill): the row at position
``j`` scores prompt token ``j + 1``, with temperature and top-k/top-p/min-p applied as vLLM
0.6.3 does for prompt rows. Everything the host needs travels in ONE device-to-host copy
(packed as float64; token ids are exact below 2**53).

The metadata comes from a ``MetadataBuilder`` that keeps its fixed parts across steps while
the batch (the same request states, in the same order) does not change.

Multi-step batches (decodes only) use ``MultiStepSampling``: the metadata is built once,
each step samples on the device (the ids feed the next step's forward), and all steps'
ids and logprobs come back in one copy at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from pagedllm.core.scheduler_output import TokenLogprobs
from pagedllm.sample.metadata import MetadataBuilder, SamplingMetadata, build_filter_metadata
from pagedllm.sample.ops.logprobs import LogprobsTensors, gather_logprobs
from pagedllm.sample.sampler import Sampler, SamplerOutput, apply_filters


@dataclass
class StepSamples:
    token_ids: list[int]  # one per sampling request, in order
    logprobs: dict[str, TokenLogprobs]  # req_id -> the sampled token's logprobs
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]]  # req_id -> (first pos, rows)


@dataclass
class _PromptRows:
    req_ids: list[str]  # one per row
    positions: list[int]  # prompt position scored by the row (1 .. num_prompt_tokens - 1)
    rows: list[int]  # row in the flat batch
    params: list  # SamplingParams per row
    targets: list[int]  # the prompt token at ``positions``


def prompt_logprob_rows(req_ids: list[str], num_scheduled: dict[str, int],
                        requests: dict) -> _PromptRows | None:
    """Rows of the flat batch whose logits score a prompt token for prompt_logprobs.

    ``req_ids`` is the batch order; each request's scheduled tokens are contiguous rows.
    """
    out = _PromptRows([], [], [], [], [])
    offset = 0
    for req_id in req_ids:
        state, n = requests[req_id], num_scheduled[req_id]
        params = state.sampling_params
        start = state.num_computed_tokens
        if params.prompt_logprobs is not None and start + 1 < state.num_prompt_tokens:
            for pos in range(start, min(start + n, state.num_prompt_tokens - 1)):
                out.req_ids.append(req_id)
                out.positions.append(pos + 1)
                out.rows.append(offset + pos - start)
                out.params.append(params)
                out.targets.append(state.token_ids[pos + 1])
        offset += n
    return out if out.rows else None


def _flat(t: LogprobsTensors, with_ids: bool) -> list[torch.Tensor]:
    pieces = [t.token_ids] if with_ids else []
    pieces += [t.logprobs, t.ranks, t.topk_ids.flatten(), t.topk_logprobs.flatten()]
    return [p.to(torch.float64) for p in pieces]


def _unpack(host: np.ndarray, offset: int, num_rows: int, k: int, token_ids: list[int],
            keep: list[int]) -> tuple[list[TokenLogprobs], int]:
    """Rebuild per-row TokenLogprobs from the packed host array (keep[i] top-k per row)."""
    lps = host[offset:offset + num_rows]
    ranks = host[offset + num_rows:offset + 2 * num_rows]
    offset += 2 * num_rows
    topk_ids = host[offset:offset + num_rows * k].reshape(num_rows, k)
    topk_lps = host[offset + num_rows * k:offset + 2 * num_rows * k].reshape(num_rows, k)
    rows = [TokenLogprobs(token_ids[i], float(lps[i]), int(ranks[i]),
                          topk_ids[i, :keep[i]].astype(np.int64).tolist(),
                          topk_lps[i, :keep[i]].tolist()) for i in range(num_rows)]
    return rows, offset + 2 * num_rows * k


def _sampled_logprobs(host: np.ndarray, offset: int, states: list, num_logprobs: list[int],
                      k: int, token_ids: list[int]) -> tuple[list[tuple[str, TokenLogprobs]], int]:
    """One step's sampled-token logprobs from the packed host array: (req_id, entry) for the
    states that need them (``SamplingMetadata.num_logprobs`` >= 0), and the next offset."""
    rows, offset = _unpack(host, offset, len(states), k, token_ids,
                           [max(n, 0) for n in num_logprobs])
    return [(s.req_id, row) for s, row, n in zip(states, rows, num_logprobs) if n >= 0], offset


def _guided_in_order(rows: torch.Tensor, mask: torch.Tensor,
                     meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided rows (state order) as rows of the metadata's (maybe permuted) order."""
    if meta.inverse is None:
        return rows, mask
    if rows.shape[0] == meta.inverse.shape[0]:  # every row, in state order: permute the mask
        return rows, mask.index_select(0, meta.order.to(mask.device))
    return meta.inverse.to(rows.device)[rows], mask


class StepSampler:
    def __init__(self, model: torch.nn.Module, vocab_size: int, generator: torch.Generator,
                 device: torch.device) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.generator = generator
        self.device = device
        self.sampler = Sampler()
        # keeps the fixed parts of the metadata while the batch stays the same
        # rows in path order (``metadata.py``): logits are computed in that order
        self.metadata = MetadataBuilder(vocab_size, generator, device, permute=True)

    def __call__(self, hidden: torch.Tensor, logits_indices: torch.Tensor, states: list,
                 prompt_rows: _PromptRows | None, guided=None) -> StepSamples:
        """guided: ``GuidedInputs`` (logits masks of the grammar-constrained states) or None."""
        sampled, sample_lp, num_logprobs = None, None, []
        pieces: list[torch.Tensor] = []
        if states:
            meta = self.metadata.build(states)
            if meta.order is not None:
                logits_indices = logits_indices[meta.order]
            logits = self.model.compute_logits(hidden[logits_indices])
            if guided is not None:
                meta.guided_rows, meta.guided_mask = _guided_in_order(guided.rows, guided.mask,
                                                                      meta)
            out = self.sampler(logits, meta)  # ids and logprobs come back in state order
            sampled, sample_lp, num_logprobs = out.sampled_ids, out.logprobs, meta.num_logprobs
        prompt_lp, num_prompt_k = None, 0
        if prompt_rows is not None:
            prompt_lp, num_prompt_k = self._prompt_logprobs(hidden, prompt_rows, states)
        if sample_lp is None and prompt_lp is None:
            return StepSamples(sampled.tolist() if sampled is not None else [], {}, {})
        if sampled is not None:
            pieces.append(sampled.to(torch.float64))
            if sample_lp is not None:
                pieces += _flat(sample_lp, with_ids=False)
        if prompt_lp is not None:
            pieces += _flat(prompt_lp, with_ids=False)
        host = torch.cat(pieces).cpu().numpy()  # the one device-to-host copy
        return self._unpack(host, states, sample_lp, num_logprobs, prompt_rows, prompt_lp,
                            num_prompt_k)

    def _prompt_logprobs(self, hidden: torch.Tensor, rows: _PromptRows,
                         states: list) -> tuple[LogprobsTensors, int]:
        logits = self.model.compute_logits(
            hidden[torch.tensor(rows.rows, dtype=torch.long, device=self.device)])
        logits = apply_filters(logits, build_filter_metadata(rows.params, self.vocab_size,
                                                             self.device))
        k = max(p.prompt_logprobs for p in rows.params)
        target_t = torch.tensor(rows.targets, dtype=torch.long, device=self.device)
        return gather_logprobs(logits.log_softmax(dim=-1), target_t, k), k

    def _unpack(self, host, states, sample_lp, num_logprobs, prompt_rows, prompt_lp,
                num_prompt_k):
        n = len(states)
        token_ids = host[:n].astype(np.int64).tolist()
        offset = n
        logprobs: dict[str, TokenLogprobs] = {}
        if sample_lp is not None:
            rows, offset = _sampled_logprobs(host, offset, states, num_logprobs,
                                             sample_lp.topk_ids.shape[1], token_ids)
            logprobs = dict(rows)
        prompt: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        if prompt_lp is not None:
            keep = [p.prompt_logprobs for p in prompt_rows.params]
            rows, offset = _unpack(host, offset, len(prompt_rows.rows), num_prompt_k,
                                   prompt_rows.targets, keep)
            for req_id, pos, row in zip(prompt_rows.req_ids, prompt_rows.positions, rows):
                prompt.setdefault(req_id, (pos, []))[1].append(row)
        return StepSamples(token_ids, logprobs, prompt)


class MultiStepSampling:
    """Sampling for ``num_steps`` decode steps of one batch (every state samples each step)."""

    def __init__(self, sampler: StepSampler, states: list) -> None:
        self.model = sampler.model
        self.sampler = sampler.sampler
        self.states = states
        self.meta: SamplingMetadata = sampler.metadata.build(states)
        self._seeded = self.meta.seeded
        self._outputs: list[SamplerOutput] = []
        self._host: torch.Tensor | None = None  # ids (and logprobs) of every step, as float64
        self._copied: torch.cuda.Event | None = None

    def sample(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_states, hidden] of the next step -> sampled ids [num_states] on device."""
        step = len(self._outputs)
        # a seeded row draws from (seed, index of the token): the index moves on each step
        if self._seeded is not None:
            self.meta.seeded = replace(self._seeded, indices=self._seeded.indices + step)
        if self.meta.order is not None:
            hidden = hidden[self.meta.order]
        out = self.sampler(self.model.compute_logits(hidden), self.meta)
        self._outputs.append(out)
        return out.sampled_ids

    def start_copy(self) -> None:
        """Queue the one device-to-host copy of every step's ids (and logprobs) behind the
        last step, into pinned memory: ``results`` waits for it alone, not for work queued
        after it (the next batch of a lookahead, pagedllm/core/scheduler.py)."""
        outs = self._outputs
        pieces = [torch.stack([o.sampled_ids for o in outs], dim=1).flatten().to(torch.float64)]
        if outs[0].logprobs is not None:
            pieces += [p for o in outs for p in _flat(o.logprobs, with_ids=False)]
        values = torch.cat(pieces)
        if not values.is_cuda:
            self._host, self._copied = values, None
            return
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self._host.copy_(values, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    @property
    def last_ids(self) -> torch.Tensor:
        """[num_states] ids sampled by the last step, on the device."""
        return self._outputs[-1].sampled_ids

    def results(self) -> tuple[list[list[int]], dict[str, list[TokenLogprobs]]]:
        """Per state, the ids of every step; per state asking for them, their logprobs
        (after ``start_copy``)."""
        outs, n = self._outputs, len(self.states)
        with_lp = outs[0].logprobs is not None
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host.numpy()
        ids = host[:n * len(outs)].astype(np.int64).reshape(n, len(outs))
        token_ids = ids.tolist()
        logprobs: dict[str, list[TokenLogprobs]] = {}
        if with_lp:
            offset = n * len(outs)
            k = outs[0].logprobs.topk_ids.shape[1]
            for step in range(len(outs)):
                rows, offset = _sampled_logprobs(host, offset, self.states,
                                                 self.meta.num_logprobs, k,
                                                 ids[:, step].tolist())
                for req_id, row in rows:
                    logprobs.setdefault(req_id, []).append(row)
        return token_ids, logprobs
