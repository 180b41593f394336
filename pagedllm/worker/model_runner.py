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
A pooling model (``model.pooler``: embedding / reward models) samples nothing: step 5 pools
the final hidden states of each request whose prompt is complete (``_pool``) and returns
them instead of tokens; with chunked prefill an ALL pooler's earlier chunks' rows are kept.
A multi-step batch (``SchedulerOutput.multi_step``, decodes only) repeats 4-5 on the
device: each step's sampled ids, positions + 1, sequence lengths + 1 and the slots read from
the block table become the next step's inputs, and the host sees all steps' ids at the end.
Its steps are queued in ``launch`` and its ids copied to the host in ``finish``; a batch
launched before that (the scheduler's lookahead) takes the last step's ids on the device as
its input tokens (``_late_inputs``) and the projected counts the scheduler sent.

A step runs in two halves, ``launch`` (1-3 and the forward) and ``finish`` (logits,
sampling, state updates), so that the engine core keeps batches in flight (async output
processing: the device runs the next batch while the host makes outputs), and with pipeline
parallelism this stage can run the forward of the next micro-batch before the last stage has
sent back this one's logits. The last stage samples at once in ``launch`` (its broadcast of
the logits then waits for the other stages' ``finish``), so it never holds a batch's logits
back behind its next forward.
Launched steps finish in order; ``execute_model`` is both halves at once. A multi-step
batch does all its work in ``finish`` (the engine never launches another one around it).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.attention.backend import (AttentionMetadata, ForwardContext, PrefillSeq,
                                        get_attn_backend)
from pagedllm.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagedllm.distributed import PendingSend, get_pp_size, is_last_stage, wait_sends
from pagedllm.guided.matchers import GuidedMatchers
from pagedllm.worker.step_sampler import MultiStepSampling, StepSampler, prompt_logprob_rows
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.adapters import AdapterStore
from pagedllm.worker.lora import LoadedLoRA, LoRABatch, LoRASlotTable
from pagedllm.worker.prompt_adapter import LoadedPromptAdapter
from pagedllm.spec_decode import SpecRows, verify
from pagedllm.tensors import to_device
from pagedllm.worker.cache_engine import CacheEngine
from pagedllm.worker.cuda_graph import CUDAGraphRunner


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_output_tokens: int
    num_prompt_tokens: int
    prompt_adapter: LoadedPromptAdapter | None = None
    lora: LoadedLoRA | None = None
    pooling_params: object = None  # PoolingParams of a pooling request


@dataclass
class _Batch:
    req_ids: list[str]
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling_reqs] row of each sampling request's last token
    sampling_req_ids: list[str]
    # speculating requests: their drafts and rows (spec_rows [sum(len(draft) + 1)])
    specs: list[SpecRows] = field(default_factory=list)
    spec_rows: torch.Tensor | None = None
    # prompt adapters: (rows [n], embeddings [n, hidden]) replacing the placeholders' embeddings
    embed_overrides: tuple[torch.Tensor, torch.Tensor] | None = None
    lora: LoRABatch | None = None  # which rows use which LoRA slot (--enable-lora)


@dataclass
class _Launched:
    """A step whose forward is queued: what ``finish`` needs to sample it."""
    so: SchedulerOutput
    batch: _Batch | None = None  # None: nothing scheduled
    hidden: torch.Tensor | None = None  # None for a multi-step batch (runs in finish)
    pending_masks: object = None  # guided decoding masks being filled
    # hidden-state sends to the next stage (each forward's ForwardContext.sends), awaited
    # when the step is sampled
    sends: list[PendingSend] = field(default_factory=list)
    output: ModelRunnerOutput | None = None  # set at launch on the last pipeline stage
    started: float = 0.0  # perf_counter at launch (--collect-detailed-traces)
    forward_time: float = 0.0  # seconds of forward, device synchronized (ditto)
    sampling: MultiStepSampling | None = None  # a multi-step batch whose steps are queued
    states: list = field(default_factory=list)  # its requests' states
    base: list[int] = field(default_factory=list)  # their computed counts at launch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: CacheEngine, device: torch.device,
                 vocab_size: int, seed: int,
                 kv_scales: list[tuple[float, float]] | None = None,
                 spec_typical: tuple[float, float] | None = None,
                 collect_times: tuple[bool, bool] = (False, False),
                 lora_table: LoRASlotTable | None = None,
                 graph_sizes: tuple[int, int] | None = None,
                 adapters: AdapterStore | None = None) -> None:
        """``lora_table``: the --enable-lora slots. ``graph_sizes``: (max_num_seqs,
        max_seq_len_to_capture) where the worker wants CUDA graphs (CUDA, eager not forced,
        no LoRA, one pipeline stage); they are captured here, with the triton backend.
        ``adapters``: the worker's adapter weights, by the ids new requests name."""
        self.model = model
        self.kv_scales = kv_scales  # per layer (k, v) scales of an fp8 cache
        self.spec_typical = spec_typical  # typical acceptance (threshold, alpha), or None
        # --collect-detailed-traces: (forward time, execute time) per step in the outputs
        self.collect_forward, self.collect_execute = collect_times
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step_sampler = StepSampler(model, vocab_size, self.generator, device)
        self.requests: dict[str, CachedRequestState] = {}
        self.guided = GuidedMatchers(vocab_size, device)  # grammar matchers of guided requests
        self.backend = get_attn_backend(device)
        self.lora_table = lora_table
        self.adapters = adapters
        self.pooler = getattr(model, "pooler", None)  # a pooling model's (layers/pooler.py)
        # ALL pooling with chunked prefill: req_id -> the rows of its chunks so far, in
        # prompt order (kept across a swap preemption, which resumes mid-prompt)
        self._pool_rows: dict[str, list[torch.Tensor]] = {}
        self._launched_steps: deque[_Launched] = deque()  # launched, not finished, in order
        # req_id -> (ids sampled by the last step of a launched multi-step batch, its row):
        # the request's newest token, not on the host until that batch finishes
        self._late_inputs: dict[str, tuple[torch.Tensor, int]] = {}
        self.graphs: CUDAGraphRunner | None = None
        if graph_sizes is not None and self.backend.name == "triton":
            self.graphs = CUDAGraphRunner(model, cache.gpu_cache, self.backend, self.block_size,
                                          *graph_sizes, device, kv_scales)
            self.graphs.capture()  # every size now: capturing mid-run stalls the batch

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            if req_id not in so.preempted_req_ids:
                self._pool_rows.pop(req_id, None)
            self._late_inputs.pop(req_id, None)
            self.guided.remove(req_id)
        if so.blocks_to_copy:  # first: the source must not yet be overwritten by a swap-in
            self.cache.copy_blocks(so.blocks_to_copy)
        if so.blocks_to_swap_out:
            self.cache.swap_out(so.blocks_to_swap_out)
        if so.blocks_to_swap_in:
            self.cache.swap_in(so.blocks_to_swap_in)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.sampling_params, list(new.block_ids),
                new.num_computed_tokens, new.num_output_tokens, new.num_prompt_tokens,
                *self._adapter_weights(new), new.pooling_params)
            if new.req_id in self._pool_rows:
                self._resume_pool_rows(new.req_id, new.num_computed_tokens)
            guide = new.sampling_params.compiled_guide
            if guide is not None:  # after a recompute preemption: replay the outputs so far
                self.guided.add(new.req_id, guide, new.token_ids[new.num_prompt_tokens:])
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _adapter_weights(self, new: NewRequestData,
                         ) -> tuple[LoadedPromptAdapter | None, LoadedLoRA | None]:
        """The weights of the adapters a new request names (its prompt adapter, its LoRA),
        from the worker's store."""
        if new.prompt_adapter_request is None and new.lora_request is None:
            return None, None
        if self.adapters is None:
            raise RuntimeError(f"request {new.req_id} names an adapter; this runner has no "
                               "adapter store")
        return (self.adapters.prompt_adapter(new.prompt_adapter_request),
                self.adapters.lora(new.lora_request))

    def _build_batch(self, so: SchedulerOutput) -> _Batch:
        """The step's flat inputs; a multi-step batch's block table covers all its steps."""
        num_sched = so.num_scheduled_tokens
        decodes = [r for r, n in num_sched.items() if n == 1]
        prefills = [r for r, n in num_sched.items() if n > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling_req_ids: list[str] = []
        late: list[tuple[int, torch.Tensor, int]] = []
        decode_meta = self._decode_inputs(decodes, input_ids, positions, slots,
                                          so.num_steps - 1, late)
        prefill_seqs = []
        override_rows, override_values = [], []
        bs = self.block_size
        for req_id in prefills:  # chunks of prompts, and speculating decodes with drafts
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_sched[req_id]
            block_ids = state.block_ids[:-(-end // bs)]
            prefill_seqs.append(PrefillSeq(len(input_ids), end - start, end,
                                           self._tensor(block_ids)))
            adapter = state.prompt_adapter
            if adapter is not None and start < adapter.num_virtual_tokens:
                stop = min(end, adapter.num_virtual_tokens)
                override_rows.extend(range(len(input_ids), len(input_ids) + stop - start))
                override_values.append(adapter.embeddings[start:stop])
            input_ids.extend(state.token_ids[start:end] + so.spec_token_ids.get(req_id, []))
            positions.extend(range(start, end))
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
        row = 0
        specs, spec_rows = [], []
        for req_id in decodes + prefills:
            state = self.requests[req_id]
            row += num_sched[req_id]
            if req_id in so.spec_token_ids:  # logits at the last token and every draft token
                specs.append(SpecRows(state, so.spec_token_ids[req_id], len(spec_rows)))
                spec_rows.extend(range(row - num_sched[req_id], row))
            elif state.num_computed_tokens + num_sched[req_id] >= len(state.token_ids):
                logits_rows.append(row - 1)
                sampling_req_ids.append(req_id)
        meta = AttentionMetadata(bs, self._tensor(slots), len(decodes), *decode_meta,
                                 prefill_seqs)
        if prefill_seqs and self.backend.needs_packed_prefill:
            self._pack_prefills(meta, [self.requests[r].block_ids for r in prefills])
        lora_batch = None
        if self.lora_table is not None:
            lora_batch = self.lora_table.batch(
                [self.requests[r].lora for r in decodes + prefills for _ in range(num_sched[r])],
                self.device)
        input_ids_t = self._tensor(input_ids)
        for src in {id(t): t for _, t, _ in late}.values():  # tokens still on the device
            rows = [(i, r) for i, t, r in late if t is src]
            input_ids_t[self._tensor([i for i, _ in rows])] = \
                src[self._tensor([r for _, r in rows])].to(input_ids_t.dtype)
        return _Batch(decodes + prefills, input_ids_t, self._tensor(positions), meta,
                      self._tensor(logits_rows), sampling_req_ids, specs,
                      self._tensor(spec_rows) if specs else None,
                      (self._tensor(override_rows), torch.cat(override_values).to(self.device))
                      if override_rows else None, lora_batch)

    def _decode_inputs(self, decodes: list[str], input_ids: list[int], positions: list[int],
                       slots: list[int], lookahead: int = 0, late: list | None = None):
        """Token, position and slot of each decode, plus the block table covering them and
        ``lookahead`` more tokens. A token not on the host yet is a placeholder here and
        (row, device ids, their row) goes to ``late``."""
        if not decodes:
            return None, None
        bs = self.block_size
        states = [self.requests[r] for r in decodes]
        seq_lens = [s.num_computed_tokens + 1 for s in states]
        num_blocks = -(-(max(seq_lens) + lookahead) // bs)
        table = np.zeros((len(states), num_blocks), dtype=np.int64)  # [num_decodes, num_blocks]
        for i, s in enumerate(states):
            pos = s.num_computed_tokens
            used = s.block_ids[:num_blocks]
            table[i, :len(used)] = used
            if pos < len(s.token_ids):
                input_ids.append(s.token_ids[pos])
            else:  # sampled by a launched multi-step batch that has not finished
                input_ids.append(0)
                late.append((i, *self._late_inputs[s.req_id]))
            positions.append(pos)
            slots.append(s.block_ids[pos // bs] * bs + pos % bs)
        return (self._tensor(seq_lens, torch.int32), to_device(table, torch.int32, self.device))

    def _pack_prefills(self, meta: AttentionMetadata, block_ids: list[list[int]]) -> None:
        """Block table, lengths and query offsets of the prefills as tensors (Triton path)."""
        seqs = meta.prefills
        num_blocks = max(-(-s.seq_len // self.block_size) for s in seqs)
        table = np.zeros((len(seqs), num_blocks), dtype=np.int32)
        for i, (seq, ids) in enumerate(zip(seqs, block_ids)):
            used = ids[:-(-seq.seq_len // self.block_size)]
            table[i, :len(used)] = used
        meta.prefill_block_table = to_device(table, torch.int32, self.device)
        meta.prefill_seq_lens = self._tensor([s.seq_len for s in seqs], torch.int32)
        starts = np.cumsum([0] + [s.num_query_tokens for s in seqs])
        meta.prefill_query_start_loc = self._tensor(starts.tolist(), torch.int32)
        meta.max_prefill_query_len = max(s.num_query_tokens for s in seqs)

    def _tensor(self, values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def _graphed(self, meta: AttentionMetadata, embed_overrides=None,
                 lora_batch: LoRABatch | None = None) -> bool:
        return self.graphs is not None and self.graphs.can_run(meta) and \
            embed_overrides is None and lora_batch is None

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, embed_overrides=None,
                 lora_batch: LoRABatch | None = None,
                 advance: bool = False) -> tuple[torch.Tensor, list[PendingSend]]:
        """The model's hidden states and the sends to the next pipeline stage it started
        (``ForwardContext.sends``; none on the last stage and in a CUDA graph). ``advance``:
        the next step of a multi-step batch whose last step replayed a graph: ``input_ids``
        are its new ids, the graph's buffers move the rest on in place."""
        if advance:
            return self.graphs.advance(input_ids), []
        if self._graphed(meta, embed_overrides, lora_batch):
            return self.graphs.run(input_ids, positions, meta), []
        ctx = ForwardContext(meta, self.cache.gpu_cache, self.backend, self.kv_scales,
                             embed_overrides, lora_batch)
        return self.model(input_ids, positions, ctx), ctx.sends

    def _next_decode_meta(self, meta: AttentionMetadata,
                          positions: torch.Tensor) -> AttentionMetadata:
        """Metadata of the next step of a multi-step batch: one more token per sequence,
        written to the slot its block table gives for ``positions``."""
        table = meta.decode_block_table
        block = table.gather(1, (positions // self.block_size).unsqueeze(1)).squeeze(1)
        slots = block.long() * self.block_size + positions % self.block_size
        return AttentionMetadata(self.block_size, slots, meta.num_decodes,
                                 meta.decode_seq_lens + 1, table, [])

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.launch(so)
        return self.finish()

    @torch.inference_mode()
    def launch(self, so: SchedulerOutput) -> None:
        """Apply the step's diffs, build the batch and queue its forward."""
        step = _Launched(so, started=time.perf_counter())
        self._update_states(so)
        batch = None if so.is_empty else self._build_batch(so)
        step.batch = batch
        self._launched_steps.append(step)
        if batch is None:
            return
        if so.multi_step:
            if get_pp_size() == 1:  # with pipeline stages the steps run in finish
                self._launch_steps(step, batch, so.num_steps)
            return
        step.pending_masks = self.guided.fill_async(batch.sampling_req_ids)  # overlaps
        step.hidden = self._timed_forward(step, batch.input_ids, batch.positions,
                                          batch.attn_metadata, batch.embed_overrides,
                                          batch.lora)
        if get_pp_size() > 1 and is_last_stage():
            # the last stage has everything now: it computes the logits and sends them to
            # the other stages (their ``finish``) without waiting for its next forward
            step.output = self._sample(step)

    @torch.inference_mode()
    def finish(self) -> ModelRunnerOutput:
        """Sample the oldest launched step and advance its requests' states. Detailed traces:
        its forward seconds (timed in ``launch``) and its execute seconds, from its launch to
        now (the core runs such batches one at a time, so no two spans overlap)."""
        step = self._launched_steps.popleft()
        output = step.output if step.output is not None else self._sample(step)
        if self.collect_forward:
            output.model_forward_time = step.forward_time
        if self.collect_execute:
            output.model_execute_time = time.perf_counter() - step.started
        return output

    def _timed_forward(self, step: _Launched, *args) -> torch.Tensor:
        """``_forward``, its sends kept with ``step``; with --collect-detailed-traces model,
        timed to the device's end."""
        start = time.perf_counter()
        hidden, sends = self._forward(*args)
        step.sends.extend(sends)
        if self.collect_forward:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step.forward_time += time.perf_counter() - start
        return hidden

    def _sample(self, step: _Launched) -> ModelRunnerOutput:
        so, batch = step.so, step.batch
        if batch is None:
            return ModelRunnerOutput([], [])
        if so.multi_step:
            if step.sampling is None:
                self._launch_steps(step, batch, so.num_steps)
            output = self._finish_steps(step, batch, so.num_steps)
            wait_sends(step.sends)
            return output
        if self.pooler is not None:
            return self._pool(step)
        states = [self.requests[r] for r in batch.sampling_req_ids]
        prompt_rows = prompt_logprob_rows(batch.req_ids, so.num_scheduled_tokens, self.requests)
        pending = step.pending_masks
        guided = pending.result() if pending is not None else None
        samples = self.step_sampler(step.hidden, batch.logits_indices, states, prompt_rows,
                                    guided)
        wait_sends(step.sends)
        if guided is not None:
            self.guided.accept(batch.sampling_req_ids, samples.token_ids)
        sampled: dict[str, list[int]] = {}
        for state, token_id in zip(states, samples.token_ids):
            state.token_ids.append(token_id)
            state.num_output_tokens += 1
            sampled[state.req_id] = [token_id]
        if batch.specs:  # accepted drafts plus one token each (pagedllm/spec_decode.py)
            logits = self.model.compute_logits(step.hidden[batch.spec_rows])
            verified, spec_logprobs = verify(logits, batch.specs, self.generator,
                                             self.vocab_size, self.spec_typical)
            for spec, tokens in zip(batch.specs, verified):
                spec.state.token_ids.extend(tokens)
                spec.state.num_output_tokens += len(tokens)
                sampled[spec.state.req_id] = tokens
        for req_id in batch.req_ids:
            # a speculating request's valid KV: its last token and the accepted drafts
            self.requests[req_id].num_computed_tokens += len(sampled[req_id]) \
                if req_id in so.spec_token_ids else so.num_scheduled_tokens[req_id]
        logprobs = {r: [lp] for r, lp in samples.logprobs.items()}
        if batch.specs:
            logprobs.update(spec_logprobs)
        return ModelRunnerOutput(batch.req_ids, [sampled.get(r, []) for r in batch.req_ids],
                                 logprobs, samples.prompt_logprobs)

    def _pool(self, step: _Launched) -> ModelRunnerOutput:
        """A pooling model's step: advance every request by its scheduled tokens and pool
        those whose prompt is now complete (``ModelRunnerOutput.pooled``); nothing is
        sampled. Rows are in ``batch.req_ids`` order (single-token chunks first)."""
        so, batch = step.so, step.batch
        wait_sends(step.sends)
        done_ids, done_rows = [], []
        start = 0
        for req_id in batch.req_ids:
            state, num = self.requests[req_id], so.num_scheduled_tokens[req_id]
            rows = step.hidden[start:start + num]  # [num, dim]
            start += num
            state.num_computed_tokens += num
            if self.pooler.keeps_all_rows:
                self._pool_rows.setdefault(req_id, []).append(rows)
            if state.num_computed_tokens >= len(state.token_ids):
                if self.pooler.keeps_all_rows:
                    rows = torch.cat(self._pool_rows.pop(req_id))
                done_ids.append(req_id)
                done_rows.append(rows)
        pooled = dict(zip(done_ids, self.pooler.pool(done_rows))) if done_ids else {}
        return ModelRunnerOutput(batch.req_ids, [[] for _ in batch.req_ids], pooled=pooled)

    def _resume_pool_rows(self, req_id: str, num_computed_tokens: int) -> None:
        """A preempted ALL-pooling request is back: keep its chunks' rows up to where it
        resumes (none after a recompute, all after a swap)."""
        kept, total = [], 0
        for rows in self._pool_rows.pop(req_id):
            if total + len(rows) > num_computed_tokens:
                break
            kept.append(rows)
            total += len(rows)
        if total != num_computed_tokens:
            raise RuntimeError(f"pooling request {req_id}: {num_computed_tokens} prompt tokens "
                               f"were computed but the rows of only {total} are kept")
        if kept:
            self._pool_rows[req_id] = kept

    def _launch_steps(self, launched: _Launched, batch: _Batch, num_steps: int) -> None:
        """Queue ``num_steps`` decode steps back to back (see the module docstring) and the
        copy of their ids to the host."""
        launched.states = states = [self.requests[r] for r in batch.req_ids]
        launched.base = [s.num_computed_tokens for s in states]
        launched.sampling = sampling = MultiStepSampling(self.step_sampler, states)
        input_ids, positions, meta = batch.input_ids, batch.positions, batch.attn_metadata
        graphed = self._graphed(meta, None, batch.lora)  # every step then fits the graph
        for step in range(num_steps):
            if step and not graphed:
                positions = positions + 1
                meta = self._next_decode_meta(meta, positions)
            input_ids = sampling.sample(self._timed_forward(
                launched, input_ids, positions, meta, None, batch.lora, step > 0 and graphed))
        sampling.start_copy()
        for row, req_id in enumerate(batch.req_ids):
            self._late_inputs[req_id] = (input_ids, row)

    def _finish_steps(self, launched: _Launched, batch: _Batch,
                      num_steps: int) -> ModelRunnerOutput:
        """The host's half of a multi-step batch: its ids, appended to the states (whose
        computed counts a later lookahead batch may already have moved on)."""
        token_ids, logprobs = launched.sampling.results()
        last = launched.sampling.last_ids
        for state, ids, base in zip(launched.states, token_ids, launched.base):
            state.token_ids.extend(ids)
            state.num_output_tokens += num_steps
            state.num_computed_tokens = max(state.num_computed_tokens, base + num_steps)
            if self._late_inputs.get(state.req_id, (None,))[0] is last:
                del self._late_inputs[state.req_id]
        return ModelRunnerOutput(batch.req_ids, token_ids, logprobs)
