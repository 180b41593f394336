"""``EngineCore``: the control plane and the executor, stepping requests it was given as token ids.

The core owns every ``Request`` (scheduler, KV-cache manager, LoRA / prompt-adapter weights,
compiled guided-decoding constraints) and never detokenizes. Its whole interface is messages:

* in: ``CoreRequest`` (a prepared request: token ids, cloned and checked sampling params, or
  the ``PoolingParams`` of an embedding model's prefill-only request) and aborts by sequence
  id;
* out: one ``CoreOutputs`` per ``step()``: a ``SeqDelta`` for every sequence that received
  tokens (or prompt logprobs, or its pooled output), its finish status, and the step's
  scheduler stats.

The front end (``engine/output_processor.py``) turns deltas into text, stop strings and
``RequestOutput``s; a stop string it finds comes back as an abort. ``LLMEngine`` runs both in
one process (``LLM``, tests, ``--disable-frontend-multiprocessing``); ``pagedllm serve`` runs
the core in its own process (``engine/core_client.py``). The same code steps in both.

A step is schedule (control plane) -> execute (compute plane) -> update, run as one in-flight
queue of launched batches (``step``): a batch is launched (``executor.launch``: the forward is
queued) and later finished in launch order (``executor.finish``: sampled, then applied to the
scheduler), with up to ``_depth`` batches in flight: 1 plain, 2 with the lookahead, N with
``-pp N``.

Async output processing (on CUDA unless ``--disable-async-output-proc``; ``_ahead``): the device
never waits for the host's output work.
1. After step t is finished (its ids on the host, ``update_from_output`` applied: tokens, stop
   ids and max_tokens), the next step is scheduled and launched before step t's deltas are
   returned, so the device runs it while the front end makes step t's outputs. Only a stop
   *string* is therefore seen one step late: that request ran one step too many, and its extra
   token is dropped (the front end has finished it); its blocks are freed when that step is over
   (the scheduler defers frees of requests in flight).
2. Lookahead: while a decode batch runs, the next batch of the same requests is scheduled as if
   its tokens had arrived (the scheduler's ``schedule_lookahead``: counts projected ahead,
   blocks allocated for both) and launched; the runner feeds it the running batch's last ids
   on the device. With ``--num-scheduler-steps N`` these batches run N steps each; with 1 they
   are one-step batches (``SchedulerOutput.multi_step``), so decode steps are launched back to
   back. A request that stopped inside batch t ran in batch t+1 for nothing; its late tokens
   are dropped.
Speculative decoding and ``--collect-detailed-traces`` get 1 but not 2, at depth 1: a step's
drafts are proposed from the tokens the previous step accepted, so it cannot be scheduled
before that step is finished; and a batch's model forward / execute times are taken by the
runner from its launch to its finish (``ModelRunner.launch`` / ``finish``), which batches in
flight together would count twice. At depth 1 a batch's execute time therefore includes the
front end's output work made while it ran (as vLLM 0.6.3's includes its output callback).

Pipeline parallelism (``-pp N``): up to N micro-batches of disjoint requests are in flight, each
launched on every rank and finished in order, so stage 0 runs batch k+1 while stage 1 runs
batch k.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.adapters import LoRARequest, PromptAdapterRequest
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput, TokenLogprobs
from pagedllm.engine.stats import StatLogger
from pagedllm.engine.timeline import Timeline
from pagedllm.executor import make_executor
from pagedllm.gc_tuning import tune_gc
from pagedllm.guided.service import GuideService
from pagedllm.worker.prompt_adapter import check_prompt_adapter_support
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def _prefill_only_params() -> SamplingParams:
    """The scheduler-side params of a pooling request: one token at most, greedy, no stops;
    the request finishes when its prompt is computed, before anything could be sampled."""
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


def use_async_output_proc(config: EngineConfig) -> bool:
    """``EngineConfig.async_output_proc`` (decided there, once)."""
    return config.async_output_proc


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence ``index`` of a best_of group: same parameters, its own seed stream."""
    if index == 0 or params.seed is None:
        return params
    child = params.clone()
    child.seed = hash((params.seed, index)) & 0x7FFF_FFFF
    return child


def seq_ids(request_id: str, best_of: int) -> list[str]:
    """Scheduler ids of a request's sequences: the parent keeps the user's id."""
    return [request_id] + [f"{request_id}#{i}" for i in range(1, best_of)]


@dataclass
class CoreRequest:
    """A request prepared by the front end: prompt ids final (truncated), params cloned,
    checked and completed with the generation config's EOS ids."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    arrival_time: float
    priority: int = 0
    prompt_adapter_request: PromptAdapterRequest | None = None
    lora_request: LoRARequest | None = None


class SeqDelta(NamedTuple):
    """What one sequence got in one step (a tuple on the wire: cheap to pickle)."""
    seq_id: str
    new_token_ids: list[int]
    status: int  # RequestStatus after the step
    stop_reason: int | str | None
    logprobs: list[TokenLogprobs | None] | None  # one per new token, if the request wants them
    prompt_logprobs: tuple[int, list[TokenLogprobs]] | None  # (first position, entries)
    # (first_scheduled_time, first_token_time, num_cached_tokens)
    times: tuple[float | None, float | None, int]
    # finished only: (scheduler_time, model_forward_time, model_execute_time)
    trace_times: tuple[float, float | None, float | None] | None = None
    multi_step: bool = False  # from a multi-step batch (--multi-step-stream-outputs)
    pooled: Any = None  # a pooling request's output (host float32 tensor) when it finished


@dataclass
class CoreOutputs:
    deltas: list[SeqDelta] = field(default_factory=list)
    stats: dict[str, Any] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, log_stats: bool | None = None, inputs=None) -> None:
        """``inputs``: the front end's ``PromptProcessor`` when both run in one process (its
        tokenizer serves guided decoding); a core process loads its own on first need."""
        self.config = config
        self._inputs = inputs
        mc, cc, sc = config.model, config.cache, config.scheduler
        self.executor = make_executor(config)  # one Worker, or tensor-parallel ranks
        self.worker = self.executor.driver_worker
        # -pp N: up to N micro-batches in flight, so that every stage has work
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self._in_flight: deque[SchedulerOutput] = deque()  # launched, oldest first
        self.kv_cache_manager = KVCacheManager(
            self.executor.num_gpu_blocks, self.executor.num_cpu_blocks, cc.block_size,
            cc.enable_prefix_caching, sc.num_lookahead_slots)
        self.scheduler = self._make_scheduler(config)
        # adapters are loaded once per id by the driver worker (pagedllm/worker/adapters.py)
        self._adapters = self.worker.adapters
        if config.prompt_adapter.enable_prompt_adapter:
            check_prompt_adapter_support(mc.hf_config)
        if log_stats is None:
            log_stats = not config.observability.disable_log_stats
        self.stat_logger = StatLogger(self) if log_stats else None
        self.timeline = Timeline.create("core")  # PAGEDLLM_STEP_TIMELINE: where time goes
        self._profiler: torch.profiler.profile | None = None  # between /start_profile and /stop
        # built on the first guided request (needs a tokenizer)
        self.guided_compiler: GuideService | None = None
        self._pending: dict[str, tuple[CoreRequest, Future]] = {}  # compiling constraints
        self._setup_overlap(config)
        tune_gc()  # the model is loaded: freeze it out of the collector's way

    def _make_scheduler(self, config: EngineConfig) -> Scheduler:
        mc, sc = config.model, config.scheduler
        # None in these flags means "derive it"; create_engine_config has derived them
        assert mc.max_model_len is not None and sc.max_num_batched_tokens is not None
        assert sc.enable_chunked_prefill is not None
        return Scheduler(
            max_num_batched_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            enable_chunked_prefill=sc.enable_chunked_prefill,
            preemption_mode=sc.preemption_mode or "recompute", policy=sc.scheduling_policy,
            delay_factor=sc.scheduler_delay_factor, max_model_len=mc.max_model_len,
            kv_cache_manager=self.kv_cache_manager, num_scheduler_steps=sc.num_scheduler_steps,
            pipeline_depth=self.pipeline_depth,
            spec=config.spec,
            max_prompt_adapters=config.prompt_adapter.max_prompt_adapters,
            max_loras=config.lora.max_loras, lookahead=config.lookahead)

    def _setup_overlap(self, config: EngineConfig) -> None:
        """The in-flight queue's shape (module docstring): ``_depth`` batches in flight at
        most (the pipeline's stages, 2 with the lookahead, else 1); ``_ahead``: async output
        processing, the next batch is launched before a step's deltas are returned."""
        self._lookahead = config.lookahead  # off for speculative decoding, detailed traces
        self._ahead = config.async_output_proc  # off with -pp: the micro-batches overlap
        self._depth = self.pipeline_depth if self.pipeline_depth > 1 else 1 + self._lookahead

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: CoreRequest) -> Request:
        """Queue a prepared request (and its best_of children); ValueError naming the bad
        field (adapter, LoRA, guided-decoding constraint). Returns the parent ``Request``.
        A constraint not compiled yet is compiled here, waiting at most the compile budget
        (``guided/service.py``); the core process uses ``submit_request`` instead."""
        self._check_id(req)
        params = req.params
        if isinstance(params, SamplingParams) and params.guided_decoding is not None:
            params.compiled_guide = self._guided_compiler().compile(
                params.guided_decoding)  # type: ignore[arg-type]  # no dict after __post_init__
        return self._enqueue(req)

    def submit_request(self, req: CoreRequest) -> Request | None:
        """``add_request`` that never waits for a compile: None while the request's
        constraint compiles off this thread (the request waits outside the scheduler;
        ``finish_pending`` adds it, or gives its error, once the compile is done)."""
        self._check_id(req)
        params = req.params
        if not isinstance(params, SamplingParams) or params.guided_decoding is None:
            return self._enqueue(req)
        # ignored: SamplingParams.__post_init__ made a dict a GuidedDecodingParams
        future = self._guided_compiler().submit(params.guided_decoding)  # type: ignore[arg-type]
        if future.done():
            params.compiled_guide = future.result()
            return self._enqueue(req)
        self._pending[req.request_id] = (req, future)
        return None

    def has_pending(self) -> bool:
        """Requests waiting for their constraint's compile."""
        return bool(self._pending)

    def finish_pending(self) -> list[tuple[CoreRequest, Request | None, Exception | None]]:
        """Add the pending requests whose compile is done: (request, added, None) or
        (request, None, the error)."""
        done = [rid for rid, (_, future) in self._pending.items() if future.done()]
        results: list[tuple[CoreRequest, Request | None, Exception | None]] = []
        for request_id in done:
            req, future = self._pending.pop(request_id)
            try:
                assert isinstance(req.params, SamplingParams)  # only those are compiled
                req.params.compiled_guide = future.result()
                results.append((req, self._enqueue(req), None))
            except Exception as exc:  # noqa: BLE001 - the add's rejection, for its caller
                results.append((req, None, exc))
        return results

    def _check_id(self, req: CoreRequest) -> None:
        if req.request_id in self._pending or req.request_id in self.scheduler.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")

    def _enqueue(self, req: CoreRequest) -> Request:
        """Load the request's adapters (the driver worker's store: ValueError on a bad one)
        and hand it (and its best_of children) to the scheduler; its constraint, if any, is
        compiled already. The scheduler sees only the adapters' requests (ids)."""
        adapter = self._adapters.prompt_adapter(req.prompt_adapter_request)
        self._adapters.lora(req.lora_request)
        pooling: PoolingParams | None = None
        if isinstance(req.params, PoolingParams):  # prefill only: the placeholder never samples
            params, pooling = _prefill_only_params(), req.params
        else:
            params = req.params
        token_ids = req.prompt_token_ids
        if adapter is not None:  # placeholders whose embeddings the soft prompt replaces
            token_ids = [0] * adapter.num_virtual_tokens + list(token_ids)
        max_model_len = self.config.model.max_model_len
        assert params.best_of is not None  # SamplingParams' init sets it (to n by default)
        ids = seq_ids(req.request_id, params.best_of)
        if any(i in self.scheduler.requests for i in ids):
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        requests = [Request(seq_id, token_ids, child_params(params, i),
                            arrival_time=req.arrival_time, priority=req.priority,
                            max_model_len=max_model_len) for i, seq_id in enumerate(ids)]
        for request in requests:
            request.prompt_adapter_request = req.prompt_adapter_request
            request.lora_request = req.lora_request
            request.pooling_params = pooling
        self.scheduler.add_request(requests[0], requests[1:])
        if self.timeline is not None:
            self.timeline.add("add", len(token_ids))
        return requests[0]

    def _guided_compiler(self) -> GuideService:
        """Bounded compiles in a worker process (built on the first guided request)."""
        if self.guided_compiler is None:
            from pagedllm.engine.inputs import PromptProcessor
            inputs = self._inputs or PromptProcessor(self.config.model)
            self.guided_compiler = GuideService(
                inputs.tokenizer, self.config.model.vocab_size, inputs.eos_token_ids,
                self.config.decoding.guided_decoding_backend)
        return self.guided_compiler

    def abort(self, seq_ids: list[str],
              status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End these sequences (unknown or finished ids are ignored); blocks are freed now,
        or when the batch that still holds them is over. A request still waiting for its
        compile is dropped (its caller has gone: no answer is owed)."""
        for seq_id in seq_ids:
            self._pending.pop(seq_id, None)
        self.scheduler.finish_requests(seq_ids, status)

    def fail_all(self) -> list[str]:
        """After a step raised: drop the batches in flight and abort every request (their
        blocks are freed). Returns the ids of the sequences that were aborted."""
        self._in_flight.clear()
        self.scheduler.drop_in_flight()
        seq_ids = list(self.scheduler.requests)
        self.abort(seq_ids)
        return seq_ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[SeqDelta]:
        """One step: launch batches until ``_depth`` are in flight (1 plain, speculative
        decoding and detailed traces; 2 with the lookahead; the pipeline's stage count with
        ``-pp``), finish the oldest and return its deltas; with async output processing, the
        next batch is launched before returning when nothing is left in flight, so the device
        runs it while the caller makes outputs (module docstring). No batch is left in flight
        when this raises."""
        try:
            deltas = self._launch_ready()
            if self._in_flight:
                deltas += self._finish_step()
            if self._ahead and not self._in_flight and self.scheduler.has_unfinished_requests():
                self._launch(self.scheduler.schedule())
        except BaseException:
            self._in_flight.clear()  # the executor has failed for good
            raise
        return deltas

    def _launch_ready(self) -> list[SeqDelta]:
        """Launch the batches the scheduler has until ``_depth`` are in flight. With pipeline
        stages a multi-step batch runs alone: the batches ahead of it finish first (their
        deltas are returned)."""
        deltas: list[SeqDelta] = []
        while len(self._in_flight) < self._depth:
            scheduler_output = self._next_batch()
            if scheduler_output is None:
                break
            alone = self.pipeline_depth > 1 and scheduler_output.num_steps > 1
            while alone and self._in_flight:
                deltas += self._finish_step()
            self._launch(scheduler_output)
            if scheduler_output.is_empty or alone:
                break
        return deltas

    def _next_batch(self) -> SchedulerOutput | None:
        """The next batch to launch, or None: behind a running batch the lookahead's
        continuation of it, or with pipeline stages a batch of requests not in flight."""
        sched = self.scheduler
        if self._in_flight and self._lookahead:
            return sched.schedule_lookahead(self._in_flight[-1])
        if self.pipeline_depth > 1:
            return sched.schedule() if sched.has_schedulable_requests() else None
        return sched.schedule() if sched.has_unfinished_requests() else None

    def _launch(self, scheduler_output: SchedulerOutput) -> None:
        self.executor.launch(scheduler_output)
        self._in_flight.append(scheduler_output)

    def _finish_step(self) -> list[SeqDelta]:
        """Finish the oldest batch in flight and apply it."""
        scheduler_output = self._in_flight.popleft()
        return self._apply(scheduler_output, self.executor.finish())

    def _apply(self, scheduler_output, runner_output) -> list[SeqDelta]:
        """Update the scheduler with a finished step; the deltas of its sequences."""
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        if self.stat_logger is not None:
            self.stat_logger.record(scheduler_output, updated)
        if self.timeline is not None:  # (time, requests, tokens, new prefills, waiting)
            self.timeline.add("step", len(scheduler_output.num_scheduled_tokens),
                              scheduler_output.total_num_scheduled_tokens,
                              len(scheduler_output.scheduled_new_reqs),
                              len(self.scheduler.waiting))
        prompt_logprobs, multi = runner_output.prompt_logprobs, scheduler_output.num_steps > 1
        deltas = [_delta(request, num_new, runner_output.logprobs.get(request.req_id),
                         prompt_logprobs.get(request.req_id), multi,
                         runner_output.pooled.get(request.req_id))
                  for request, num_new in updated]
        seen = {request.req_id for request, _ in updated}
        for seq_id, entries in prompt_logprobs.items():  # prompt chunks without a token
            request = self.scheduler.requests.get(seq_id)
            if seq_id not in seen and request is not None:
                deltas.append(_delta(request, 0, None, entries, multi))
        return deltas

    # ---- stats ---------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """Scheduler queues, KV usage and speculative-decoding counters (for /metrics)."""
        sched, kv = self.scheduler, self.kv_cache_manager
        acceptance, efficiency = sched.spec_rates()
        return {
            "num_requests_running": len(sched.running),
            "num_requests_waiting": len(sched.waiting),
            "num_requests_swapped": len(sched.swapped),
            "gpu_cache_usage_perc": kv.usage(),
            "cpu_cache_usage_perc": kv.cpu_usage(),
            "gpu_prefix_cache_hit_rate": kv.prefix_cache_hit_rate(),
            "num_preemptions_total": sched.num_preemptions_total,
            "spec_decode_enabled": sched.spec is not None,
            "spec_decode_draft_acceptance_rate": acceptance,
            "spec_decode_efficiency": efficiency,
            "spec_decode_num_accepted_tokens_total": sched.spec_accepted_tokens_total,
            "spec_decode_num_draft_tokens_total": sched.spec_draft_tokens_total,
            "spec_decode_num_emitted_tokens_total": sched.spec_emitted_tokens_total,
        }

    def cache_info(self) -> dict[str, Any]:
        """Block counts fixed at start-up (vllm:cache_config_info)."""
        return {"num_gpu_blocks": self.kv_cache_manager.pool.num_blocks,
                "num_cpu_blocks": self.kv_cache_manager.num_cpu_blocks}

    def shutdown(self) -> None:
        if self.timeline is not None:
            logger.info("step timeline written to %s", self.timeline.save())
            self.timeline = None
        if self.guided_compiler is not None:  # kills a compile in progress
            self.guided_compiler.close()
        self.executor.shutdown()

    # ---- utility calls (``call_core``: /start_profile, /stop_profile, runtime LoRA) ---
    def start_profile(self, trace_dir: str) -> str:
        """/start_profile: a torch profiler over the core's steps from now on (CPU, plus CUDA
        when there is a GPU; with stacks), as vLLM 0.6.3's worker builds it. The core runs the
        steps, so its process is the one to profile. Returns the directory."""
        if self._profiler is not None:
            raise RuntimeError("the profiler is already running; call /stop_profile first")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(trace_dir, exist_ok=True)
        profiler = torch.profiler.profile(
            activities=activities, with_stack=True,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(trace_dir, use_gzip=True))
        profiler.start()
        self._profiler = profiler
        return trace_dir

    def stop_profile(self) -> None:
        """/stop_profile: stop the profiler; its trace handler writes
        ``<host>_<pid>.<time>.pt.trace.json.gz`` into the directory given at start."""
        profiler = self._profiler
        if profiler is None:
            raise RuntimeError("the profiler is not running; call /start_profile first")
        self._profiler = None
        profiler.stop()

    def check_lora(self, request: LoRARequest) -> int:
        """/v1/load_lora_adapter: load the adapter now (ValueError for a bad directory or
        checkpoint, before any request names it). Returns its rank."""
        return self._adapters.lora(request).rank

    def remove_lora(self, lora_int_id: int) -> bool:
        """/v1/unload_lora_adapter: drop the adapter's host weights; requests that still run
        with it keep their slot. True if it was loaded. Its id is never given out again."""
        return self._adapters.remove_lora(lora_int_id)


def _delta(request: Request, num_new: int, logprobs, prompt_logprobs,
           multi_step: bool, pooled=None) -> SeqDelta:
    new_ids = request.output_token_ids[len(request.output_token_ids) - num_new:] \
        if num_new else []
    trace_times = None
    if request.is_finished():
        trace_times = (request.scheduler_time, request.model_forward_time,
                       request.model_execute_time)
    return SeqDelta(request.req_id, new_ids, int(request.status), request.stop_reason,
                    logprobs, prompt_logprobs,
                    (request.first_scheduled_time, request.first_token_time,
                     request.num_cached_tokens), trace_times, multi_step, pooled)
