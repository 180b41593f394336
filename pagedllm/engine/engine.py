"""The engine: requests in, ``RequestOutput`` out. One ``step()`` is
schedule (control plane) -> execute (compute plane) -> update -> detokenize -> outputs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.inputs import PromptInputs, PromptProcessor
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.stats import StatLogger
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.worker.worker import Worker


@dataclass
class _RequestState:
    request: Request
    detokenizer: IncrementalDetokenizer
    num_sent_chars: int = 0
    num_sent_tokens: int = 0


class LLMEngine:
    def __init__(self, config, log_stats: bool | None = None) -> None:
        self.config = config
        mc, cc, sc = config.model, config.cache, config.scheduler
        self.inputs = PromptProcessor(mc)
        self.tokenizer = self.inputs.tokenizer
        self.worker = Worker(config)
        self.kv_cache_manager = KVCacheManager(
            self.worker.num_gpu_blocks, self.worker.num_cpu_blocks, cc.block_size,
            cc.enable_prefix_caching, sc.num_lookahead_slots)
        self.scheduler = Scheduler(
            max_num_batched_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            enable_chunked_prefill=sc.enable_chunked_prefill,
            preemption_mode=sc.preemption_mode or "recompute", policy=sc.scheduling_policy,
            delay_factor=sc.scheduler_delay_factor, max_model_len=mc.max_model_len,
            kv_cache_manager=self.kv_cache_manager)
        if log_stats is None:
            log_stats = not config.observability.disable_log_stats
        self.stat_logger = StatLogger(self) if log_stats else None
        self._states: dict[str, _RequestState] = {}

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), **kwargs)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptInputs, params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0) -> Request:
        """Validate and queue a request; raises ValueError naming the bad field."""
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        unsupported = params.unsupported_fields()
        if unsupported:
            raise ValueError(f"SamplingParams field(s) {', '.join(unsupported)} are not supported "
                             "yet (sampling issue #3)")
        if priority != 0 and self.config.scheduler.scheduling_policy != "priority":
            raise ValueError(f"priority={priority} needs --scheduling-policy priority")
        text, token_ids = self.inputs.process(prompt)
        params = params.clone()
        params.update_from_generation_config(self.inputs.eos_token_ids)
        request = Request(request_id, token_ids, params, prompt=text, arrival_time=arrival_time,
                          priority=priority, max_model_len=self.config.model.max_model_len)
        self.scheduler.add_request(request)
        self._states[request_id] = _RequestState(
            request, IncrementalDetokenizer(self.tokenizer, token_ids, params))
        return request

    def abort_request(self, request_ids: str | list[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for req_id in request_ids:
            self._states.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.worker.execute_model(scheduler_output)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs = []
        for request in updated:
            state = self._states[request.req_id]
            self._detokenize(state)
            output = self._make_output(state)
            if output is not None:
                outputs.append(output)
            if request.is_finished():
                del self._states[request.req_id]
        if self.stat_logger is not None:
            self.stat_logger.record(scheduler_output, updated)
        return outputs

    def _detokenize(self, state: _RequestState) -> None:
        """New text of the last token, then the stop rules that work on text (vLLM order)."""
        request, detok = state.request, state.detokenizer
        num_chars = detok.update(request.output_token_ids[-1])
        params = request.sampling_params
        if request.status == RequestStatus.FINISHED_STOPPED:
            detok.drop_last(num_chars)  # ended by EOS or a stop token id
            return
        if request.num_output_tokens < params.min_tokens:
            return
        stop = detok.find_stop_string(num_chars)
        if stop is None:
            return
        request.stop_reason = stop
        if request.is_finished():
            request.status = RequestStatus.FINISHED_STOPPED
        else:
            self.scheduler.finish_requests([request.req_id], RequestStatus.FINISHED_STOPPED)

    def _make_output(self, state: _RequestState) -> RequestOutput | None:
        request = state.request
        finished = request.is_finished()
        kind = request.sampling_params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        text, token_ids = state.detokenizer.output_text, request.output_token_ids
        if kind == RequestOutputKind.DELTA:
            text, token_ids = text[state.num_sent_chars:], token_ids[state.num_sent_tokens:]
            state.num_sent_chars = len(state.detokenizer.output_text)
            state.num_sent_tokens = request.num_output_tokens
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(token_ids), cumulative_logprob=None,
            logprobs=None, finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None)
        now = time.time()
        metrics = RequestMetrics(
            arrival_time=request.arrival_time, last_token_time=now,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            time_in_queue=(request.first_scheduled_time or now) - request.arrival_time,
            finished_time=now if finished else None)
        return RequestOutput(
            request_id=request.req_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, prompt_logprobs=None,
            outputs=[completion], finished=finished, metrics=metrics,
            num_cached_tokens=request.num_cached_tokens)
