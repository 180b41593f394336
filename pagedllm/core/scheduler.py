"""The token-budget scheduler: which requests compute how many tokens in the next step.

There is no prefill or decode phase. Each request carries ``num_computed_tokens`` and
``num_tokens``; a step hands out tokens under two budgets (``max_num_batched_tokens`` tokens,
``max_num_seqs`` running requests) until every request's computed count catches up.

One ``schedule()`` call, in order:
1. Running requests, oldest first, each get what they still need (one token when decoding,
   a chunk of the prompt with chunked prefill). When blocks run out, the lowest-priority
   running request not yet scheduled this step is preempted (recompute or swap) until the
   current one fits, or the current one is itself preempted.
2. If nothing was preempted, swapped requests come back (swap-in) while they fit.
3. If nothing was preempted, waiting requests are admitted in policy order (arrival, or
   ``priority`` then arrival), each with its prefix-cache hit counted as already computed.
   Without chunked prefill a prompt is admitted only whole; the queue head blocks the rest.

Multi-step (``--num-scheduler-steps N``): when a step holds only decodes of requests the
runner already knows, and none needs per-token host work in its sampler (penalties, logits
processors, guided decoding, min_tokens not yet reached), each request gets blocks for
``S = min(N, ...)`` tokens and the runner decodes ``S`` steps back to back on the device,
feeding each sampled token into the next step. ``S`` stops at the longest remaining
``max_tokens`` and at ``max_model_len``; tokens after a request's stop are discarded.
Steps with prefills (or after a failed block allocation) run one step.

Lookahead (``schedule_lookahead``, the engine's async output processing, ``lookahead``):
while a multi-step batch runs on the device, the next one is scheduled for the same
requests as if every step's token had arrived (counts projected ``num_steps`` ahead, blocks
allocated for both batches), so the device never waits for the host between batches. With
``--num-scheduler-steps 1`` the same holds for one-step batches: a decode-only batch that
qualifies for multi-step is marked ``multi_step`` with one step, so its successor can take
its ids on the device. It happens only in a steady state: every running request in that
one batch, no swapped requests, no seeded random sampling, and no waiting prompts unless the
batch keeps every seat (requests ending by length in the running batch are left out of the
next). A request that stops inside the
running batch (EOS, stop string, abort) has already been scheduled in the next one: its late
tokens are dropped and its blocks freed when that batch is over (``in_flight`` counts the
batches a request is in).

Pipeline micro-batches (``pipeline_depth`` > 1, i.e. ``-pp``): the engine schedules a new
batch while earlier ones are still in flight. A request stays "in flight" from the
``schedule()`` that includes it to the ``update_from_output`` of that batch: it is not
scheduled again, never chosen as a preemption victim, and if it ends meanwhile (abort,
stop string) its blocks are freed only when its batch is over. Each batch takes at most
``ceil(unfinished requests / depth)`` sequences, so the batches in flight stay balanced.

``n`` / ``best_of``: only the first sequence of a request is queued. When it gets its first
token, ``update_from_output`` forks the others: each shares the prompt's full KV blocks (one
more reference each) and gets a copy of the block holding the last prompt token
(``blocks_to_copy`` in the next ``SchedulerOutput``), then recomputes just that last prompt
token to sample its own first token. Without a free block for the copy, a child is queued
as a normal request instead (it recomputes the prompt; prefix caching may still share it).
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence

from pagedllm.core.kv_cache_manager import KVCacheManager, cdiv
from pagedllm.core.scheduler_output import (CachedRequestData, ModelRunnerOutput,
                                            NewRequestData, SchedulerOutput)
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.spec_propose import NgramProposer, SpecSettings, can_speculate


class Scheduler:
    def __init__(self, *, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool, preemption_mode: str, policy: str,
                 delay_factor: float, max_model_len: int,
                 kv_cache_manager: KVCacheManager, num_scheduler_steps: int = 1,
                 pipeline_depth: int = 1, spec: SpecSettings | None = None,
                 max_prompt_adapters: int = 1, max_loras: int = 1,
                 lookahead: bool = False) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.preemption_mode = preemption_mode
        self.policy = policy
        self.delay_factor = delay_factor
        self.max_model_len = max_model_len
        self.kv = kv_cache_manager
        self.num_scheduler_steps = num_scheduler_steps
        # the engine schedules ahead (async output processing, ``EngineConfig.lookahead``):
        # decode-only batches then run as multi-step batches even of one step, so that the
        # next one can be launched before their ids reach the host
        self.lookahead = lookahead
        self.pipeline_depth = pipeline_depth
        self.spec = spec
        self.max_prompt_adapters = max_prompt_adapters
        self.max_loras = max_loras
        # ids of the prompt adapters / LoRAs in this step's batch (``_adapter_fits``)
        self._step_adapters: set[int] = set()
        self._step_loras: set[int] = set()
        self._proposer = NgramProposer(spec.ngram_max, spec.ngram_min) if spec else None
        self._speculate = False  # this step's batch may speculate
        # req_id -> batches holding it whose output is not applied yet (lookahead: up to 2)
        self.in_flight: Counter[str] = Counter()
        self._free_after_step: dict[str, Request] = {}  # ended while in flight
        self._batch_seq_cap = max_num_seqs  # most sequences in this schedule()'s batch
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self._finished_req_ids: set[str] = set()  # runner must drop these at the next step
        self._fork_children: dict[str, list[Request]] = {}  # parent req_id -> unforked children
        self._pending_copies: list[tuple[int, int]] = []  # block copies of this step's forks
        self._unknown_to_runner: set[str] = set()  # forked children not yet sent to the runner
        self.num_preemptions_total = 0
        # speculative decoding: draft tokens verified, accepted, tokens emitted (accepted plus
        # one a request-step) and request-steps that speculated
        self.spec_draft_tokens_total = self.spec_accepted_tokens_total = 0
        self.spec_emitted_tokens_total = self.spec_steps_total = 0
        self._prev_step_time = 0.0
        self._prev_step_had_prompt = False
        self._last_prompt_latency = 0.0

    # ---- queue management ----------------------------------------------------------------
    def add_request(self, request: Request, fork_children: Sequence[Request] = ()) -> None:
        """Queue ``request``; ``fork_children`` (best_of > 1) are forked from it after its
        prefill, see the module docstring."""
        if request.req_id in self.in_flight or request.req_id in self._free_after_step:
            # a batch launched ahead still computes the request that had this id
            raise ValueError(f"request id {request.req_id!r} is still finishing; use another id")
        num_blocks = cdiv(request.num_tokens, self.kv.block_size)
        if num_blocks > self.kv.pool.num_blocks:
            raise ValueError(
                f"prompt of {request.num_tokens} tokens needs {num_blocks} KV-cache blocks but "
                f"the cache has only {self.kv.pool.num_blocks}; shorten the prompt or give the "
                "cache more memory (--gpu-memory-utilization / --num-gpu-blocks-override)")
        self.requests[request.req_id] = request
        if fork_children:
            self._fork_children[request.req_id] = list(fork_children)
        self._enqueue_waiting(request)

    def _enqueue_waiting(self, request: Request, front: bool = False) -> None:
        if self.policy == "priority":
            key = (request.priority, request.arrival_time)
            idx = next((i for i, r in enumerate(self.waiting)
                        if (r.priority, r.arrival_time) > key), len(self.waiting))
            self.waiting.insert(idx, request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def finish_requests(self, req_ids, status: RequestStatus) -> None:
        """End requests from outside the step (abort, stop string) and free their blocks
        (once their batch is over, for a request in flight)."""
        for req_id in req_ids:
            self._fork_children.pop(req_id, None)
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            for queue in (self.waiting, self.running, self.swapped):
                if request in queue:
                    queue.remove(request)
            request.status = status
            self._release(request)

    def _release(self, request: Request) -> None:
        """A finished request's blocks: freed now, or when the batches holding it are over
        (its late tokens are dropped: the scheduler no longer knows it)."""
        if request.req_id not in self.in_flight:
            self._free(request)
            return
        del self.requests[request.req_id]
        self._free_after_step[request.req_id] = request
        if self._proposer is not None:
            self._proposer.forget(request.req_id)

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._finished_req_ids.add(request.req_id)
        del self.requests[request.req_id]
        if self._proposer is not None:
            self._proposer.forget(request.req_id)

    def drop_in_flight(self) -> None:
        """A step failed: no batch in flight will ever finish. Forget them, and free the
        blocks of requests that ended while they ran."""
        self.in_flight.clear()
        for request in self._free_after_step.values():
            self.kv.free(request)
            self._finished_req_ids.add(request.req_id)
        self._free_after_step.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def has_schedulable_requests(self) -> bool:
        """Anything a new batch could take now (requests not already in flight)."""
        return bool(self.waiting or self.swapped or
                    any(r.req_id not in self.in_flight for r in self.running))

    def spec_rates(self) -> tuple[float, float]:
        """(draft acceptance rate, system efficiency: emitted tokens over the most a step's
        drafts could have emitted), as vLLM reports them; 0 before any draft."""
        if self.spec is None or not self.spec_draft_tokens_total:
            return 0.0, 0.0
        most = self.spec_steps_total * (self.spec.num_tokens + 1)
        return (self.spec_accepted_tokens_total / self.spec_draft_tokens_total,
                self.spec_emitted_tokens_total / most)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    # ---- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        started = time.perf_counter()
        out = SchedulerOutput([], [], {}, 0, finished_req_ids=self._finished_req_ids,
                              blocks_to_copy=self._pending_copies)
        self._finished_req_ids, self._pending_copies = set(), []
        self._step_adapters, self._step_loras = set(), set()
        self._batch_seq_cap = self.max_num_seqs if self.pipeline_depth == 1 else max(1, cdiv(
            len(self.waiting) + len(self.running) + len(self.swapped), self.pipeline_depth))
        self._speculate = self.spec is not None and (
            self.spec.disable_by_batch_size is None
            or self.get_num_unfinished_requests() <= self.spec.disable_by_batch_size)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted_req_ids:
            budget = self._schedule_swapped(out, budget)
            if self._passed_delay(time.monotonic()):
                budget = self._schedule_waiting(out, budget)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        if self.num_scheduler_steps > 1 or self.lookahead:
            out.num_steps = self._plan_multi_step(out)
        out.finished_req_ids |= out.preempted_req_ids
        self.in_flight.update(list(out.num_scheduled_tokens))
        now, spent = time.time(), time.perf_counter() - started
        for req_id in out.num_scheduled_tokens:
            request = self.requests[req_id]
            request.scheduler_time += spent
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        return out

    def _num_new_tokens(self, request: Request, budget: int,
                        num_computed: int | None = None) -> int:
        """Tokens the request would compute now; 0 if it must wait for a bigger budget."""
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_new = request.num_tokens - num_computed
        if num_new > budget:
            return budget if self.enable_chunked_prefill else 0
        return num_new

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and \
                len(out.num_scheduled_tokens) < self._batch_seq_cap:
            request = self.running[i]
            num_new = 0 if request.req_id in self.in_flight or \
                not self._adapter_fits(request, out) else self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            draft = self._draft(request, budget) if num_new == 1 and self._speculate else []
            # a draft only takes free blocks: it never preempts another request
            new_blocks = self.kv.allocate_slots(request, 1 + len(draft)) if draft else None
            if new_blocks is None:
                draft = []
            num_new += len(draft)
            while new_blocks is None and \
                    (new_blocks := self.kv.allocate_slots(request, num_new)) is None:
                victim = self._pick_victim(i)
                self._preempt(victim, out)
                if victim is request:
                    break
            if new_blocks is None:
                continue  # ``request`` itself was preempted; running[i] is the next one
            if request.req_id in self._unknown_to_runner:
                self._unknown_to_runner.discard(request.req_id)
                out.scheduled_new_reqs.append(self._new_request_data(request))
            else:
                out.scheduled_cached_reqs.append(CachedRequestData(
                    request.req_id, [b.block_id for b in new_blocks],
                    request.num_computed_tokens))
            self._scheduled(out, request, num_new)
            if draft:
                out.spec_token_ids[request.req_id] = draft
            budget -= num_new
            i += 1
        return budget

    def _draft(self, request: Request, budget: int) -> list[int]:
        """Prompt-lookup draft tokens for a decoding request (``pagedllm/spec_decode.py``),
        as many as the budget, max_tokens, max_model_len and --speculative-max-model-len
        leave room for; [] when it should not speculate."""
        spec, proposer = self.spec, self._proposer
        assert spec is not None and proposer is not None  # drafts only when _speculate
        if request.req_id in self._unknown_to_runner or request.num_output_tokens == 0 or \
                request.num_computed_tokens != request.num_tokens - 1 or \
                not can_speculate(request, spec.with_logprobs):
            return []
        max_len = min(self.max_model_len, spec.max_model_len or self.max_model_len)
        room = min(spec.num_tokens, budget - 1, max_len - request.num_tokens - 1,
                   request.max_tokens - request.num_output_tokens - 1)
        return proposer.propose(request.req_id, request.all_token_ids, room)

    def _plan_multi_step(self, out: SchedulerOutput) -> int:
        """How many decode steps this batch runs (see the module docstring); extends the
        requests' blocks to cover them."""
        if out.scheduled_new_reqs or not out.scheduled_cached_reqs:
            return 1
        requests = [self.requests[c.req_id] for c in out.scheduled_cached_reqs]
        if not all(r.num_computed_tokens == r.num_tokens - 1 and r.samples_without_host_state()
                   for r in requests):
            return 1
        steps = min(self.num_scheduler_steps,
                    max(r.max_tokens - r.num_output_tokens for r in requests),
                    min(self.max_model_len - r.num_tokens + 1 for r in requests))
        if steps < self._min_multi_steps():
            return 1
        for cached, request in zip(out.scheduled_cached_reqs, requests):
            new_blocks = self.kv.allocate_slots(request, steps)
            if new_blocks is None:  # blocks already added stay: later steps use them
                return 1
            cached.new_block_ids.extend(b.block_id for b in new_blocks)
        out.multi_step = True
        return steps

    def _min_multi_steps(self) -> int:
        """The fewest steps of a multi-step batch: 2 with --num-scheduler-steps > 1 (a
        one-step batch runs as a plain step), 1 for the single-step lookahead."""
        return 2 if self.num_scheduler_steps > 1 else 1

    def schedule_lookahead(self, running: SchedulerOutput) -> SchedulerOutput | None:
        """The next multi-step batch of the requests of ``running`` (a multi-step batch not
        yet applied), scheduled as if its tokens had arrived; None outside the steady state
        (module docstring), when fewer steps than ``_min_multi_steps`` are left, or without
        free blocks for it (a lookahead never preempts)."""
        ahead = running.num_steps
        if not running.multi_step or self.swapped or self._pending_copies or \
                self.spec is not None or self.pipeline_depth > 1:
            return None
        requests = [r for req_id in running.num_scheduled_tokens
                    if (r := self.requests.get(req_id)) is not None]  # not ended meanwhile
        if not requests or len(requests) != len(self.running) or \
                any(self.in_flight[r.req_id] != 1 or r.status != RequestStatus.RUNNING
                    or r.req_id in self._fork_children
                    or (r.sampling_params.seed is not None and r.sampling_params.temperature > 0)
                    for r in requests):
            return None
        # requests that end by length inside the running batch are left out; while prompts
        # wait, a seat freed that way goes to them first (no lookahead)
        left = {r.req_id: r.max_tokens - r.num_output_tokens - ahead for r in requests}
        requests = [r for r in requests if left[r.req_id] > 0]
        if self.waiting and (len(requests) < self.max_num_seqs or not requests):
            return None
        # tokens past a request's max_tokens are dropped, but none may pass max_model_len
        steps = min(self.num_scheduler_steps, max((left[r.req_id] for r in requests), default=0),
                    min((self.max_model_len - r.num_tokens - ahead + 1 for r in requests),
                        default=0))
        if steps < self._min_multi_steps() or self.kv.num_free_blocks < sum(
                max(self.kv.num_new_blocks(r, ahead + steps), 0) for r in requests):
            return None
        out = SchedulerOutput([], [], {}, len(requests), finished_req_ids=self._finished_req_ids,
                              num_steps=steps, multi_step=True)
        self._finished_req_ids = set()
        for request in requests:
            new_blocks = self.kv.allocate_slots(request, ahead + steps)
            assert new_blocks is not None  # num_free_blocks was checked for all of them above
            out.scheduled_cached_reqs.append(CachedRequestData(
                request.req_id, [b.block_id for b in new_blocks],
                request.num_computed_tokens + ahead))
            out.num_scheduled_tokens[request.req_id] = 1
        self.in_flight.update(list(out.num_scheduled_tokens))
        return out

    def _pick_victim(self, first_unscheduled: int) -> Request:
        """Lowest-priority running request not yet scheduled this step (the newest, in fcfs)
        and not in flight (``running[first_unscheduled]`` itself never is)."""
        candidates = [r for r in self.running[first_unscheduled:]
                      if r.req_id not in self.in_flight]
        if self.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.num_preemptions_total += 1
        request.num_preemptions += 1
        out.preempted_req_ids.add(request.req_id)
        if self.preemption_mode == "swap":
            mapping = self.kv.swap_out(request)
            if mapping is not None:
                out.blocks_to_swap_out.extend(mapping)
                request.status = RequestStatus.SWAPPED
                self.swapped.append(request)
                return
        self.kv.free(request)  # recompute (also the fallback when swap space is full)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self._enqueue_waiting(request, front=True)

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs \
                and len(out.num_scheduled_tokens) < self._batch_seq_cap:
            request = self.swapped[0]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0 or not self._adapter_fits(request, out):
                break
            mapping = self.kv.swap_in(request, num_new)
            if mapping is None:
                break
            self.swapped.pop(0)
            out.blocks_to_swap_in.extend(mapping)
            self._start_running(request, num_new, out)
            budget -= num_new
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        skipped = []  # a prompt adapter too many for this step: later requests go first
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs \
                and len(out.num_scheduled_tokens) < self._batch_seq_cap:
            request = self.waiting[0]
            if not self._adapter_fits(request, out):
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, budget, num_hit_tokens)
            if num_new == 0 or self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_hit_tokens
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens
            self._start_running(request, num_new, out)
            self._prev_step_had_prompt = True
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _start_running(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._unknown_to_runner.discard(request.req_id)
        out.scheduled_new_reqs.append(self._new_request_data(request))
        self._scheduled(out, request, num_new)

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            request.req_id, list(request.all_token_ids), request.num_prompt_tokens,
            request.sampling_params, self.kv.get_block_ids(request.req_id),
            request.num_computed_tokens, request.num_output_tokens,
            request.prompt_adapter_request, request.lora_request, request.pooling_params)

    def _adapter_fits(self, request: Request, out: SchedulerOutput) -> bool:
        """--max-prompt-adapters / --max-loras: a request whose prompt adapter or LoRA would
        be one too many this step waits for a step with room."""
        pa, lora = request.prompt_adapter_request, request.lora_request
        return (pa is None or pa.prompt_adapter_id in self._step_adapters
                or len(self._step_adapters) < self.max_prompt_adapters) and \
            (lora is None or lora.lora_int_id in self._step_loras
             or len(self._step_loras) < self.max_loras)

    def _scheduled(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.num_scheduled_tokens[request.req_id] = num_new
        if request.prompt_adapter_request is not None:
            self._step_adapters.add(request.prompt_adapter_request.prompt_adapter_id)
        if request.lora_request is not None:
            self._step_loras.add(request.lora_request.lora_int_id)

    def _fork(self, parent: Request) -> None:
        """Start the parent's best_of children now that its prompt KV is computed."""
        for child in self._fork_children.pop(parent.req_id, []):
            self.requests[child.req_id] = child
            copy = self.kv.fork(parent, child)
            if copy is None:
                self._enqueue_waiting(child)
                continue
            self._pending_copies.append(copy)
            child.num_computed_tokens = child.num_prompt_tokens - 1
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self.running.append(child)
            self._unknown_to_runner.add(child.req_id)

    def _passed_delay(self, now: float) -> bool:
        """--scheduler-delay-factor: hold new prompts back for a share of the last prompt step."""
        if self._prev_step_had_prompt:
            self._last_prompt_latency = now - self._prev_step_time
        self._prev_step_time, self._prev_step_had_prompt = now, False
        if self.delay_factor <= 0 or not self.waiting or not self.running:
            return True
        earliest = min(r.arrival_time for r in self.waiting)
        return time.time() - earliest > self.delay_factor * self._last_prompt_latency

    # ---- results -------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens, finish stopped requests.

        Returns (request, number of tokens appended) for the requests that received tokens
        this step (finished ones included); tokens sampled after a stop are dropped.
        """
        updated = []
        now = time.time()
        num_scheduled = scheduler_output.num_scheduled_tokens
        _add_step_times(runner_output, [self.requests[r] for r in num_scheduled
                                        if r in self.requests])
        self.in_flight.subtract(list(num_scheduled))
        for req_id in num_scheduled:
            if self.in_flight[req_id] > 0:  # a lookahead batch still holds it
                continue
            del self.in_flight[req_id]
            ended = self._free_after_step.pop(req_id, None)
            if ended is not None:  # ended while this batch ran: its blocks are free now
                self.kv.free(ended)
                self._finished_req_ids.add(req_id)
        for req_id, token_ids in zip(runner_output.req_ids, runner_output.sampled_token_ids):
            request = self.requests.get(req_id)
            if request is None:
                continue
            if req_id in scheduler_output.spec_token_ids:
                # the KV of the last token and of the accepted drafts is valid, not the rest
                request.num_computed_tokens += len(token_ids)
                self.spec_draft_tokens_total += len(scheduler_output.spec_token_ids[req_id])
                self.spec_accepted_tokens_total += len(token_ids) - 1
                self.spec_emitted_tokens_total += len(token_ids)
                self.spec_steps_total += 1
            else:
                # a decode step computes the KV of its input token; step k > 0 of a
                # multi-step batch computes the token sampled by step k - 1
                request.num_computed_tokens += num_scheduled[req_id] + \
                    max(len(token_ids) - 1, 0)
            if req_id in runner_output.pooled:
                self._finish_pooled(request, now)
                updated.append((request, 0))
                continue
            if not token_ids:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            for num_appended, token_id in enumerate(token_ids, start=1):  # noqa: B007 - read below
                request.append_output_token(token_id)
                if request.check_stop():
                    break
            if request.req_id in self._fork_children:
                self._fork(request)
            if request.is_finished():
                self.running.remove(request)
                self._release(request)
            updated.append((request, num_appended))
        return updated

    def _finish_pooled(self, request: Request, now: float) -> None:
        """A pooling request's prompt is computed: its answer (the runner's pooled output)
        is complete, so it ends here, without an output token."""
        request.first_token_time = request.first_token_time or now
        request.status = RequestStatus.FINISHED_STOPPED
        self.running.remove(request)
        self._release(request)


def _add_step_times(output: ModelRunnerOutput, requests: list[Request]) -> None:
    """--collect-detailed-traces: add the step's forward / execute seconds to its requests."""
    for name in ("model_forward_time", "model_execute_time"):
        value = getattr(output, name)
        if value is not None:
            for request in requests:
                setattr(request, name, (getattr(request, name) or 0.0) + value)
