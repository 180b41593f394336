"""The engine: requests in, ``RequestOutput`` out. One ``step()`` is
schedule (control plane) -> execute (compute plane) -> update -> detokenize -> outputs.
A multi-step batch (``--num-scheduler-steps``) returns several tokens per request from one
execute; they are detokenized and stop-checked one by one.

Async output processing (on CUDA unless ``--disable-async-output-proc``;
``_step_lookahead``): the device never waits for the host's output work.
1. After step t is finished (its ids on the host, ``update_from_output`` applied: tokens,
   stop ids and max_tokens), the next step is scheduled and launched before step t's
   outputs are made (detokenized, stop strings applied, ``RequestOutput``s built), so the
   device runs it meanwhile. Only a stop *string* is therefore seen one step late: that
   request ran one step too many, and its extra token is dropped (the scheduler no longer
   knows it when the output arrives); its blocks are freed when that step is over (the
   scheduler defers frees of requests in flight).
2. Lookahead: while a decode batch runs, the next batch of the same requests is scheduled
   as if its tokens had arrived (the scheduler's ``schedule_lookahead``: counts projected
   ahead, blocks allocated for both) and launched; the runner feeds it the running batch's
   last ids on the device. With ``--num-scheduler-steps N`` these batches run N steps each;
   with 1 they are one-step batches (``SchedulerOutput.multi_step``), so decode steps are
   launched back to back. A request that stopped inside batch t ran in batch t+1 for
   nothing; its late tokens are dropped.
Speculative decoding and ``--collect-detailed-traces`` (whose per-request model times
would count overlapping batches twice) keep the older form: the executor runs step t+1 on a
helper thread while this thread makes step t's outputs (``_exec_thread``; the runner's
``on_launch`` tells when the forward is queued, so that this thread does not hold the GIL
meanwhile).

Pipeline parallelism (``-pp N``): up to N micro-batches of disjoint requests are in flight,
each launched on every rank (``executor.launch``) and finished in order
(``executor.finish``), so stage 0 runs batch k+1 while stage 1 runs batch k; see
``_step_micro_batches`` and the scheduler's docstring.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.engine.inputs import PromptInputs, PromptProcessor
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.sequence_group import Sequence, SequenceGroup, TokenDecoder
from pagedllm.engine.stats import StatLogger
from pagedllm.guided.compiler import GuidedCompiler
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.executor import make_executor
from pagedllm.spec_decode import SpecSettings
from pagedllm.tracing import RequestTracer
from pagedllm.lora import LoRACache, LoRARequest, projection_shapes
from pagedllm.prompt_adapter import (LoadedPromptAdapter, PromptAdapterRequest,
                                     check_prompt_adapter_support, load_prompt_adapter)


def check_request_params(params: SamplingParams, vocab_size: int, max_logprobs: int) -> None:
    """Checks that need the model: logprob caps and token ids in the vocabulary."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"SamplingParams.{name}={value} is greater than the maximum "
                             f"allowed {max_logprobs}; raise --max-logprobs or ask for fewer")
    if params.logit_bias:
        params.logit_bias = {int(k): float(v) for k, v in params.logit_bias.items()}
        bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.logit_bias has out-of-vocabulary token id(s) "
                             f"{bad[:5]}; ids must be in [0, {vocab_size})")
    if params.allowed_token_ids is not None:
        bad = [t for t in params.allowed_token_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.allowed_token_ids has out-of-vocabulary token "
                             f"id(s) {bad[:5]}; ids must be in [0, {vocab_size})")
        params.allowed_token_ids = [int(t) for t in params.allowed_token_ids]


def use_async_output_proc(config) -> bool:
    """On by default on CUDA (where the forward runs on the device while the host is free);
    off on CPU, where the forward's OpenMP threads would compete with the output work for
    the same cores. ``PAGEDLLM_ASYNC_OUTPUT_PROC=1`` turns it on anywhere (tests, CPU runs).
    With pipeline parallelism the micro-batches in flight take its place."""
    if config.scheduler.disable_async_output_proc or \
            config.parallel.pipeline_parallel_size > 1:  # micro-batches overlap instead
        return False
    return os.environ.get("PAGEDLLM_ASYNC_OUTPUT_PROC") == "1" or \
        torch.device(config.device.device).type == "cuda"


class LLMEngine:
    def __init__(self, config, log_stats: bool | None = None) -> None:
        self.config = config
        mc, cc, sc = config.model, config.cache, config.scheduler
        self.inputs = PromptProcessor(mc, config.tokenizer_pool)
        self.tokenizer = self.inputs.tokenizer
        self.executor = make_executor(config)  # one Worker, or tensor-parallel ranks
        self.worker = self.executor.driver_worker
        # -pp N: up to N micro-batches in flight, so that every stage has work
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self._in_flight: deque[SchedulerOutput] = deque()  # launched, oldest first
        self.kv_cache_manager = KVCacheManager(
            self.executor.num_gpu_blocks, self.executor.num_cpu_blocks, cc.block_size,
            cc.enable_prefix_caching, sc.num_lookahead_slots)
        self.scheduler = Scheduler(
            max_num_batched_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            enable_chunked_prefill=sc.enable_chunked_prefill,
            preemption_mode=sc.preemption_mode or "recompute", policy=sc.scheduling_policy,
            delay_factor=sc.scheduler_delay_factor, max_model_len=mc.max_model_len,
            kv_cache_manager=self.kv_cache_manager, num_scheduler_steps=sc.num_scheduler_steps,
            pipeline_depth=self.pipeline_depth,
            spec=SpecSettings.from_config(config.speculative),
            max_prompt_adapters=config.prompt_adapter.max_prompt_adapters,
            max_loras=config.lora.max_loras)
        lc = config.lora  # --enable-lora: adapters loaded once per id (pagedllm/lora.py)
        self._loras = LoRACache(lc.max_cpu_loras or lc.max_loras, lc.max_lora_rank,
                                mc.num_hidden_layers, projection_shapes(mc.hf_config)) \
            if lc.enable_lora else None
        self._prompt_adapters: dict[int, tuple[PromptAdapterRequest, LoadedPromptAdapter]] = {}
        if config.prompt_adapter.enable_prompt_adapter:
            check_prompt_adapter_support(mc.hf_config)
        if log_stats is None:
            log_stats = not config.observability.disable_log_stats
        self.stat_logger = StatLogger(self) if log_stats else None
        self.tracer = None  # --otlp-traces-endpoint: one span per finished request
        if config.observability.otlp_traces_endpoint is not None:
            self.tracer = RequestTracer(config.observability.otlp_traces_endpoint,
                                        mc.served_model_names[0])
        self._states: dict[str, SequenceGroup] = {}  # user request id -> its sequences
        self._seqs: dict[str, tuple[SequenceGroup, Sequence]] = {}  # scheduler req_id -> seq
        self._decoder = TokenDecoder(self.tokenizer)
        self.guided_compiler = GuidedCompiler(self.tokenizer, mc.vocab_size,
                                              self.inputs.eos_token_ids,
                                              config.decoding.guided_decoding_backend)
        # async output processing: a step whose outputs are not made yet, and the thread
        # that runs the executor meanwhile
        self._pending: tuple | None = None
        self._exec_thread: ThreadPoolExecutor | None = None
        self._runner = self.worker.runner
        # async output processing by launching ahead (``_step_lookahead``); the executor
        # thread below where that is unavailable (speculative decoding, executors without
        # launch / finish) or with --collect-detailed-traces: batches in flight together
        # would count the same seconds in each request's model forward / execute times
        self._lookahead = use_async_output_proc(config) and \
            config.speculative.speculative_model is None and \
            not config.observability.collect_detailed_traces and \
            hasattr(self.executor, "launch")
        self.scheduler.lookahead = self._lookahead
        if use_async_output_proc(config) and not self._lookahead:
            threads = torch.get_num_threads()
            self._exec_thread = ThreadPoolExecutor(
                1, "pagedllm-execute", initializer=torch.set_num_threads, initargs=(threads,))

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), **kwargs)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptInputs, params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    prompt_adapter_request: PromptAdapterRequest | None = None,
                    trace_headers: dict[str, str] | None = None,
                    lora_request: LoRARequest | None = None) -> Request:
        """Validate and queue a request; raises ValueError naming the bad field.
        ``trace_headers``: the caller's W3C trace context (traceparent / tracestate) that
        the request's span continues (--otlp-traces-endpoint)."""
        adapter = self._prompt_adapter(prompt_adapter_request)
        lora = self._lora(lora_request)
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        unsupported = params.unsupported_fields()
        if unsupported:
            raise ValueError(f"SamplingParams field(s) {', '.join(unsupported)} are not supported "
                             "yet")
        if priority != 0 and self.config.scheduler.scheduling_policy != "priority":
            raise ValueError(f"priority={priority} needs --scheduling-policy priority")
        text, token_ids = self.inputs.process(prompt)
        params = params.clone()
        check_request_params(params, self.config.model.vocab_size,
                             self.config.model.max_logprobs)
        if params.guided_decoding is not None:  # compiled once per constraint (cached)
            params.compiled_guide = self.guided_compiler.compile(params.guided_decoding)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        if adapter is not None:  # placeholders whose embeddings the soft prompt replaces
            token_ids = [0] * adapter.num_virtual_tokens + list(token_ids)
        params.update_from_generation_config(self.inputs.eos_token_ids)
        max_model_len = self.config.model.max_model_len
        request = Request(request_id, token_ids, params, prompt=text, arrival_time=arrival_time,
                          priority=priority, max_model_len=max_model_len)
        request.prompt_adapter, request.lora = adapter, lora
        group = SequenceGroup(request_id, params, request, self.tokenizer)
        group.trace_headers = trace_headers
        children = group.make_children(max_model_len) if params.best_of > 1 else []
        for child in children:
            child.prompt_adapter, child.lora = adapter, lora
        self.scheduler.add_request(request, children)
        self._states[request_id] = group
        for seq in group.seqs:
            self._seqs[seq.request.req_id] = (group, seq)
        return request

    def _lora(self, request: LoRARequest | None):
        """The loaded LoRA of a request, or None (ValueError on a bad one)."""
        if request is None:
            return None
        if self._loras is None:
            raise ValueError("lora_request needs --enable-lora")
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        return self._loras.get(request)

    def _prompt_adapter(self, request: PromptAdapterRequest | None):
        """The loaded adapter of a request (loaded once per id), or None."""
        if request is None:
            return None
        pa = self.config.prompt_adapter
        if not pa.enable_prompt_adapter:
            raise ValueError("prompt_adapter_request needs --enable-prompt-adapter")
        known = self._prompt_adapters.get(request.prompt_adapter_id)
        if known is not None:
            if known[0] != request:
                raise ValueError(f"prompt_adapter_id {request.prompt_adapter_id} is already "
                                 f"in use by {known[0].prompt_adapter_name!r}")
            return known[1]
        loaded = load_prompt_adapter(request, self.config.model.hf_config.hidden_size,
                                     pa.max_prompt_adapter_token)
        self._prompt_adapters[request.prompt_adapter_id] = (request, loaded)
        return loaded

    def abort_request(self, request_ids: str | list[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for req_id in request_ids:
            group = self._states.pop(req_id, None)
            if group is None:
                continue
            self.scheduler.finish_requests(group.req_ids, RequestStatus.FINISHED_ABORTED)
            for seq_id in group.req_ids:
                self._seqs.pop(seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._pending is not None or \
            bool(self._in_flight)

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pipeline_depth > 1:
            return self._step_micro_batches()
        if self._lookahead:
            return self._step_lookahead()
        if self._exec_thread is None:
            scheduler_output = self.scheduler.schedule()
            runner_output = self.executor.execute_model(scheduler_output)
            updated = self.scheduler.update_from_output(scheduler_output, runner_output)
            return self._make_outputs(scheduler_output, runner_output, updated)
        # async output processing: launch step t+1, then finish step t while it runs
        future: Future | None = None
        if self.scheduler.has_unfinished_requests():
            scheduler_output = self.scheduler.schedule()
            launched = threading.Event()
            self._runner.on_launch = launched.set
            future = self._exec_thread.submit(self.executor.execute_model, scheduler_output)
            future.add_done_callback(lambda _: launched.set())
            # let the executor thread build the batch and queue the forward before this
            # thread takes the GIL for output work (else the launch waits on it)
            launched.wait()
        previous, self._pending = self._pending, None
        try:
            outputs = self._make_outputs(*previous) if previous is not None else []
        finally:
            if future is not None:  # even on error: no step may still run when we return
                runner_output = future.result()
                updated = self.scheduler.update_from_output(scheduler_output, runner_output)
                self._pending = (scheduler_output, runner_output, updated)
        return outputs

    def _step_micro_batches(self) -> list[RequestOutput]:
        """Pipeline parallelism: launch batches of requests not in flight until
        ``pipeline_depth`` are in flight (stage 0 starts the next while later stages still
        work on earlier ones), then finish the oldest and return its outputs. A multi-step
        batch runs alone: the batches ahead of it finish first."""
        outputs: list[RequestOutput] = []
        try:
            while len(self._in_flight) < self.pipeline_depth and \
                    self.scheduler.has_schedulable_requests():
                scheduler_output = self.scheduler.schedule()
                if scheduler_output.num_steps > 1:
                    while self._in_flight:
                        outputs += self._finish_oldest()
                self._launch(scheduler_output)
                if scheduler_output.is_empty or scheduler_output.num_steps > 1:
                    break
            if self._in_flight:
                outputs += self._finish_oldest()
        except BaseException:
            self._in_flight.clear()  # the executor has failed for good
            raise
        return outputs

    def _step_lookahead(self) -> list[RequestOutput]:
        """Async output processing (module docstring): launch a batch if none is in flight,
        then its lookahead successor if the scheduler has one; finish the oldest, and when
        nothing is left in flight, schedule and launch the next batch before making the
        oldest's outputs, so that the device runs it meanwhile."""
        try:
            if not self._in_flight:
                if not self.scheduler.has_unfinished_requests():
                    return []
                self._launch(self.scheduler.schedule())
            ahead = self.scheduler.schedule_lookahead(self._in_flight[-1])
            if ahead is not None:
                self._launch(ahead)
            finished = self._finish_step()
            if not self._in_flight and self.scheduler.has_unfinished_requests():
                self._launch(self.scheduler.schedule())
        except BaseException:
            self._in_flight.clear()  # the executor has failed for good
            raise
        return self._make_outputs(*finished)

    def _launch(self, scheduler_output: SchedulerOutput) -> None:
        self.executor.launch(scheduler_output)
        self._in_flight.append(scheduler_output)

    def _finish_step(self) -> tuple:
        """Finish the oldest batch in flight and apply it: (its SchedulerOutput, the runner's
        output, the updated requests), for ``_make_outputs``."""
        scheduler_output = self._in_flight.popleft()
        runner_output = self.executor.finish()
        return scheduler_output, runner_output, self.scheduler.update_from_output(
            scheduler_output, runner_output)

    def _finish_oldest(self) -> list[RequestOutput]:
        return self._make_outputs(*self._finish_step())

    def _make_outputs(self, scheduler_output, runner_output, updated) -> list[RequestOutput]:
        """Detokenize a step's new tokens, apply stop strings, build its outputs."""
        for req_id, (first_pos, entries) in runner_output.prompt_logprobs.items():
            if req_id in self._seqs:
                self._seqs[req_id][0].add_prompt_logprobs(first_pos, entries, self._decoder)
        # --multi-step-stream-outputs: one output per decoded token, else one per step
        per_token = scheduler_output.num_steps > 1 and \
            self.config.scheduler.multi_step_stream_outputs
        outputs: list[RequestOutput] = []
        groups: dict[str, SequenceGroup] = {}
        for request, num_new in updated:
            if request.req_id not in self._seqs:  # aborted before its outputs were made
                continue
            group, seq = self._seqs[request.req_id]
            logprobs = runner_output.logprobs.get(request.req_id)
            first = request.num_output_tokens - num_new
            for i in range(num_new):
                if logprobs is not None:
                    group.add_logprobs(seq, logprobs[i], self._decoder)
                if self._detokenize(seq, first + i):
                    break
                if per_token and i < num_new - 1:
                    output = group.make_output()
                    if output is not None:
                        outputs.append(output)
            groups[group.request_id] = group
        for group in groups.values():
            output = group.make_output()
            if output is not None:
                outputs.append(output)
            if group.is_finished():
                if self.tracer is not None:
                    self.tracer.request_finished(group, group.trace_headers, time.time())
                del self._states[group.request_id]
                for seq_id in group.req_ids:
                    del self._seqs[seq_id]
        if self.stat_logger is not None:
            self.stat_logger.record(scheduler_output, updated)
        return outputs

    def _detokenize(self, seq: Sequence, index: int) -> bool:
        """New text of output token ``index``, then the stop rules that work on text (vLLM
        order). Returns True when the request ended at this token (later tokens of a
        multi-step batch are dropped)."""
        request, detok = seq.request, seq.detokenizer
        num_chars = detok.update(request.output_token_ids[index])
        params = request.sampling_params
        is_last = index == request.num_output_tokens - 1
        if is_last and request.status == RequestStatus.FINISHED_STOPPED:
            detok.drop_last(num_chars)  # ended by EOS or a stop token id
            return True
        if index + 1 < params.min_tokens:
            return False
        stop = detok.find_stop_string(num_chars)
        if stop is None:
            return False
        request.stop_reason = stop
        request.truncate_output(index + 1)
        if request.is_finished():
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_requests([request.req_id], RequestStatus.FINISHED_STOPPED)
        return True
