"""Turns a ``SchedulerOutput`` into one forward pass and sampled tokens.

The runner keeps persistent per-request state (token ids, block ids, sampling parameters):
full data arrives once in ``scheduled_new_reqs``, later steps send only new block ids and
computed counts. Each step:
1. drop finished/preempted requests, run swap copies, apply the diffs;
2. order the batch: single-token (decode) requests first, then prefills;
3. build ``input_ids``, ``positions``, ``slot_mapping`` and the attention metadata;
4. run the model, compute logits only for requests whose scheduled tokens reach the end of
   their known tokens (mid-prompt chunks of chunked prefill do not sample);
5. sample and copy the sampled ids to the host once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata, ForwardContext, PrefillSeq
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.step_sampler import StepSampler, prompt_logprob_rows
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cache_engine import CacheEngine


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_output_tokens: int
    num_prompt_tokens: int


@dataclass
class _Batch:
    req_ids: list[str]
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling_reqs] row of each sampling request's last token
    sampling_req_ids: list[str]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: CacheEngine, device: torch.device,
                 vocab_size: int, seed: int) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step_sampler = StepSampler(model, vocab_size, self.generator, device)
        self.requests: dict[str, CachedRequestState] = {}

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        if so.blocks_to_copy:  # first: the source must not yet be overwritten by a swap-in
            self.cache.copy_blocks(so.blocks_to_copy)
        if so.blocks_to_swap_out:
            self.cache.swap_out(so.blocks_to_swap_out)
        if so.blocks_to_swap_in:
            self.cache.swap_in(so.blocks_to_swap_in)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.sampling_params, list(new.block_ids),
                new.num_computed_tokens, new.num_output_tokens, new.num_prompt_tokens)
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _build_batch(self, so: SchedulerOutput) -> _Batch:
        num_sched = so.num_scheduled_tokens
        decodes = [r for r, n in num_sched.items() if n == 1]
        prefills = [r for r, n in num_sched.items() if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling_req_ids: list[str] = []
        decode_meta = self._decode_inputs(decodes, input_ids, positions, slots)
        prefill_seqs = []
        bs = self.block_size
        for req_id in prefills:
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_sched[req_id]
            block_ids = state.block_ids[:-(-end // bs)]
            prefill_seqs.append(PrefillSeq(len(input_ids), end - start, end,
                                           self._tensor(block_ids)))
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
        row = 0
        for req_id in decodes + prefills:
            state = self.requests[req_id]
            row += num_sched[req_id]
            if state.num_computed_tokens + num_sched[req_id] >= len(state.token_ids):
                logits_rows.append(row - 1)
                sampling_req_ids.append(req_id)
        meta = AttentionMetadata(bs, self._tensor(slots), len(decodes), *decode_meta,
                                 prefill_seqs)
        return _Batch(decodes + prefills, self._tensor(input_ids), self._tensor(positions), meta,
                      self._tensor(logits_rows), sampling_req_ids)

    def _decode_inputs(self, decodes: list[str], input_ids: list[int], positions: list[int],
                       slots: list[int]):
        """Token, position and slot of each decode, plus the block table covering them."""
        if not decodes:
            return None, None
        bs = self.block_size
        states = [self.requests[r] for r in decodes]
        seq_lens = [s.num_computed_tokens + 1 for s in states]
        num_blocks = -(-max(seq_lens) // bs)
        table = np.zeros((len(states), num_blocks), dtype=np.int64)  # [num_decodes, num_blocks]
        for i, s in enumerate(states):
            pos = s.num_computed_tokens
            used = s.block_ids[:num_blocks]
            table[i, :len(used)] = used
            input_ids.append(s.token_ids[pos])
            positions.append(pos)
            slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        return self._tensor(seq_lens), torch.from_numpy(table).to(self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.is_empty:
            return ModelRunnerOutput([], [])
        batch = self._build_batch(so)
        ctx = ForwardContext(batch.attn_metadata, self.cache.gpu_cache)
        hidden = self.model(batch.input_ids, batch.positions, ctx)
        states = [self.requests[r] for r in batch.sampling_req_ids]
        prompt_rows = prompt_logprob_rows(batch.req_ids, so.num_scheduled_tokens, self.requests)
        samples = self.step_sampler(hidden, batch.logits_indices, states, prompt_rows)
        sampled: dict[str, int] = {}
        for state, token_id in zip(states, samples.token_ids):
            state.token_ids.append(token_id)
            state.num_output_tokens += 1
            sampled[state.req_id] = token_id
        for req_id in batch.req_ids:
            self.requests[req_id].num_computed_tokens += so.num_scheduled_tokens[req_id]
        return ModelRunnerOutput(batch.req_ids, [sampled.get(r) for r in batch.req_ids],
                                 samples.logprobs, samples.prompt_logprobs)
