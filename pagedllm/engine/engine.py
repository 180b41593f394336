"""``LLMEngine``: the front end and the engine core in one process; requests in,
``RequestOutput`` out.

One ``step()`` is the core's step (schedule -> execute -> update, ``engine/core.py``; with
async output processing the next batch is already launched when it returns) followed by the
front end's output work on its deltas (detokenize, stop strings, outputs;
``engine/output_processor.py``). A stop string aborts its sequence in the core at once.
``LLM``, the tests and ``pagedllm serve --disable-frontend-multiprocessing`` use this class;
``pagedllm serve`` runs the same two halves in two processes (``engine/core_client.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, TypeVar

from pagedllm.core.adapters import LoRARequest, PromptAdapterRequest
from pagedllm.core.request import Request, RequestStatus
from pagedllm.engine.core import (CoreRequest, EngineCore,  # noqa: F401 (re-export)
                                  use_async_output_proc)
from pagedllm.engine.inputs import PromptInputs, PromptProcessor
from pagedllm.engine.output_processor import (OutputProcessor, check_request_params,  # noqa
                                              prepare_request)
from pagedllm.outputs import RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams
from pagedllm.tracing import RequestTracer

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

# what the core's enqueue gives back: the Request (add_request waits for a guided compile),
# or None while the compile runs (submit_request)
_Added = TypeVar("_Added", Request, Optional[Request])


def make_tracer(config: EngineConfig) -> RequestTracer | None:
    """--otlp-traces-endpoint: the front end ends one span per finished request."""
    endpoint = config.observability.otlp_traces_endpoint
    return None if endpoint is None else \
        RequestTracer(endpoint, config.model.served_model_names[0])


class LLMEngine:
    def __init__(self, config: EngineConfig, log_stats: bool | None = None) -> None:
        self.config = config
        self.inputs = PromptProcessor(config.model, config.tokenizer_pool)
        self.tokenizer = self.inputs.tokenizer
        self.core = EngineCore(config, log_stats, inputs=self.inputs)
        self.output_processor = OutputProcessor(self.tokenizer, self.inputs.max_model_len,
                                                make_tracer(config),
                                                self.inputs.lora_tokenizers)
        self._per_token = config.scheduler.multi_step_stream_outputs

    @classmethod
    def from_engine_args(cls, engine_args, **kwargs) -> "LLMEngine":
        return cls(engine_args.create_engine_config(), **kwargs)

    # the core's parts, for callers that inspect them (tests, LLM, metrics)
    scheduler = property(lambda self: self.core.scheduler)
    kv_cache_manager = property(lambda self: self.core.kv_cache_manager)
    executor = property(lambda self: self.core.executor)
    worker = property(lambda self: self.core.worker)
    stat_logger = property(lambda self: self.core.stat_logger)
    tracer = property(lambda self: self.output_processor.tracer)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptInputs,
                    params: SamplingParams | PoolingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    prompt_adapter_request: PromptAdapterRequest | None = None,
                    trace_headers: dict[str, str] | None = None,
                    lora_request: LoRARequest | None = None) -> Request:
        """Validate and queue a request; raises ValueError naming the bad field. ``params``:
        SamplingParams, or PoolingParams for an embedding model (prefill only).
        ``trace_headers``: the caller's W3C trace context (traceparent / tracestate) that
        the request's span continues (--otlp-traces-endpoint). A guided-decoding constraint
        is compiled here (within the compile budget)."""
        return self._add(self.core.add_request, request_id, prompt, params, arrival_time,
                         priority, prompt_adapter_request, trace_headers, lora_request)

    def submit_request(self, *args, **kwargs) -> Request | None:
        """``add_request`` that does not wait for a guided-decoding compile: None while the
        constraint compiles (``finish_pending`` then adds the request or gives its error);
        the in-process server uses it so that one constraint never stalls the others."""
        return self._add(self.core.submit_request, *args, **kwargs)

    def finish_pending(self) -> list[tuple[str, Request | None, Exception | None]]:
        """Requests whose compile ended: (request id, its Request, None) once added, or
        (request id, None, the error) when rejected (forgotten here too)."""
        results = []
        for core_request, added, error in self.core.finish_pending():
            request_id = core_request.request_id
            if added is None:  # rejected: ``error`` says why
                self.output_processor.remove(request_id)
            else:
                self._set_prompt(request_id, core_request, added)
            results.append((request_id, added, error))
        return results

    def has_pending(self) -> bool:
        return self.core.has_pending()

    def _add(self, enqueue: Callable[[CoreRequest], _Added], request_id: str,
             prompt: PromptInputs, params: SamplingParams | PoolingParams,
             arrival_time: float | None = None, priority: int = 0,
             prompt_adapter_request: PromptAdapterRequest | None = None,
             trace_headers: dict[str, str] | None = None,
             lora_request: LoRARequest | None = None) -> _Added:
        if request_id in self.output_processor.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, core_request = prepare_request(
            self.config, self.inputs, request_id, prompt, params, arrival_time, priority,
            prompt_adapter_request, lora_request)
        self.output_processor.add(text, core_request, trace_headers)
        try:
            request = enqueue(core_request)
        except BaseException:
            self.output_processor.remove(request_id)
            raise
        if request is not None:
            self._set_prompt(request_id, core_request, request)
        return request

    def _set_prompt(self, request_id: str, core_request, request: Request) -> None:
        """The core's final prompt (a prompt adapter's placeholders come first)."""
        if request.prompt_token_ids != core_request.prompt_token_ids:
            self.output_processor.groups[request_id].set_prompt_token_ids(
                request.prompt_token_ids)

    def abort_request(self, request_ids: str | list[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for req_id in request_ids:
            self.core.abort(self.output_processor.remove(req_id))

    def request_ids(self) -> list[str]:
        """The requests that have not finished (their outputs are still to come)."""
        return list(self.output_processor.groups)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.core.get_num_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        deltas = self.core.step()
        outputs, stopped = self.output_processor.process(deltas, self._per_token)
        if stopped:  # stop strings: the core must not run these any further
            self.core.abort(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def shutdown(self) -> None:
        self.core.shutdown()
