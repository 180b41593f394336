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
from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import Sampler
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
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.requests: dict[str, CachedRequestState] = {}

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        if so.blocks_to_swap_out:
            self.cache.swap_out(so.blocks_to_swap_out)
        if so.blocks_to_swap_in:
            self.cache.swap_in(so.blocks_to_swap_in)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.sampling_params, list(new.block_ids),
                new.num_computed_tokens, new.num_output_tokens)
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _slots(self, block_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_ids[positions // self.block_size] * self.block_size + \
            positions % self.block_size

    def _build_batch(self, so: SchedulerOutput) -> _Batch:
        num_sched = so.num_scheduled_tokens
        decodes = [r for r, n in num_sched.items() if n == 1]
        prefills = [r for r, n in num_sched.items() if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slot_chunks: list[torch.Tensor] = []
        logits_rows: list[int] = []
        sampling_req_ids: list[str] = []
        decode_meta = self._decode_inputs(decodes, input_ids, positions, slot_chunks)
        prefill_seqs = []
        for req_id in prefills:
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_sched[req_id]
            key_slots = self._slots(torch.tensor(state.block_ids, device=self.device),
                                    torch.arange(end, device=self.device))
            prefill_seqs.append(PrefillSeq(len(input_ids), end - start, end, key_slots))
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slot_chunks.append(key_slots[start:end])
        row = 0
        for req_id in decodes + prefills:
            state = self.requests[req_id]
            row += num_sched[req_id]
            if state.num_computed_tokens + num_sched[req_id] >= len(state.token_ids):
                logits_rows.append(row - 1)
                sampling_req_ids.append(req_id)
        meta = AttentionMetadata(torch.cat(slot_chunks), len(decodes), *decode_meta,
                                 prefill_seqs)
        return _Batch(decodes + prefills, self._tensor(input_ids), self._tensor(positions), meta,
                      self._tensor(logits_rows), sampling_req_ids)

    def _decode_inputs(self, decodes: list[str], input_ids: list[int], positions: list[int],
                       slot_chunks: list[torch.Tensor]):
        if not decodes:
            return None, None
        states = [self.requests[r] for r in decodes]
        seq_lens = [s.num_computed_tokens + 1 for s in states]
        max_blocks = max(len(s.block_ids) for s in states)
        table = np.zeros((len(states), max_blocks), dtype=np.int64)  # [num_decodes, max_blocks]
        for i, s in enumerate(states):
            table[i, :len(s.block_ids)] = s.block_ids
            input_ids.append(s.token_ids[s.num_computed_tokens])
            positions.append(s.num_computed_tokens)
        block_table = torch.from_numpy(table).to(self.device)
        key_pos = torch.arange(max(seq_lens), device=self.device)
        key_slots = block_table[:, key_pos // self.block_size] * self.block_size + \
            key_pos % self.block_size  # [num_decodes, max_seq_len]
        seq_lens_t = self._tensor(seq_lens)
        slot_chunks.append(key_slots.gather(1, (seq_lens_t - 1)[:, None]).squeeze(1))
        return seq_lens_t, key_slots

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
        sampled: dict[str, int] = {}
        if batch.sampling_req_ids:
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            states = [self.requests[r] for r in batch.sampling_req_ids]
            meta = build_sampling_metadata([s.sampling_params for s in states],
                                           [s.num_output_tokens for s in states],
                                           self.vocab_size, self.generator, self.device)
            token_ids = self.sampler(logits, meta).tolist()  # the one device-to-host copy
            for state, token_id in zip(states, token_ids):
                state.token_ids.append(token_id)
                state.num_output_tokens += 1
                sampled[state.req_id] = token_id
        for req_id in batch.req_ids:
            self.requests[req_id].num_computed_tokens += so.num_scheduled_tokens[req_id]
        return ModelRunnerOutput(batch.req_ids, [sampled.get(r) for r in batch.req_ids])
