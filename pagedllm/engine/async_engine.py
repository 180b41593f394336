"""``AsyncLLMEngine``: the engine loop in a background thread, requests from an asyncio loop.

Who owns what:

* The **engine thread** owns the ``LLMEngine`` (scheduler, KV-cache manager, worker). Only it
  calls ``add_request``, ``abort_request`` and ``step``; the asyncio side never touches engine
  state except to read queue lengths and KV usage for metrics (plain ``len``/counters).
* The **asyncio loop** owns one ``RequestStream`` (an ``asyncio.Queue`` of ``RequestOutput``)
  per request and the per-request statistics handed to stat listeners (Prometheus metrics).

Data flow, one direction each way::

    asyncio: add_request/abort --(thread-safe command queue)--> engine thread
    engine thread: step() outputs --(loop.call_soon_threadsafe, once per step)--> streams

The engine thread loop is: drain commands (adds raise ValueError back to the awaiting caller
without stopping the loop) -> if no unfinished requests, block on the command queue -> step()
-> hand the step's outputs to the loop. An exception inside ``step()`` fails every in-flight
request with ``EngineStepError`` and aborts them in the engine, so no client hangs; the loop
keeps serving new requests. A thread (not a process) is enough because the forward pass runs
in PyTorch kernels that release the GIL; ``benchmarks/serving.py`` measures the overhead.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from pagedllm.engine.engine import LLMEngine
from pagedllm.engine.inputs import PromptInputs
from pagedllm.engine.tokenizer_pool import pretokenize
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput, merge_delta_outputs
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedllm.engine.async")

_IDLE_WAIT_S = 1.0  # idle engine thread re-checks its stop flag this often
_PENDING_WAIT_S = 0.01  # ... and its pending guided compiles this often


class EngineStepError(RuntimeError):
    """The engine failed while running a step that this request was part of."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (stopped, or never started)."""


_ABORTED = object()  # stream sentinel: the request was aborted, end iteration quietly


@dataclass
class RequestStats:
    """What the asyncio side knows of one request, for metrics listeners."""
    request_id: str
    arrival_time: float
    params: SamplingParams | PoolingParams
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    lora_name: str | None = None  # the LoRA adapter it runs with (its served model name)
    _seen: dict[int, int] = field(default_factory=dict)  # completion index -> tokens counted

    @property
    def longest_completion(self) -> int:
        """Tokens of the longest completion (choice) so far."""
        return max(self._seen.values(), default=0)

    def count_new_tokens(self, output: RequestOutput) -> int:
        """Tokens generated since the last output, for DELTA and cumulative outputs alike
        (none for a pooling request's output)."""
        if isinstance(output, EmbeddingRequestOutput) or isinstance(self.params, PoolingParams):
            return 0
        delta = self.params.output_kind == RequestOutputKind.DELTA
        num_new = 0
        for completion in output.outputs:
            seen = self._seen.get(completion.index, 0)
            total = seen + len(completion.token_ids) if delta else len(completion.token_ids)
            num_new += total - seen
            self._seen[completion.index] = total
        self.num_generation_tokens += num_new
        return num_new


# listener(stats, output or None when aborted, number of new generated tokens)
StatListener = Callable[[RequestStats, "RequestOutput | None", int], None]


class RequestStream:
    """Async iterator over one request's outputs; ends after the finished output."""

    def __init__(self, request_id: str, stats: RequestStats) -> None:
        self.request_id = request_id
        self.stats = stats
        self.finished = False
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _ABORTED:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if not self._queue.empty() and \
                getattr(self.stats.params, "output_kind", None) == RequestOutputKind.DELTA:
            item = self._coalesce(item)  # the reader fell behind: one chunk for all pending
        if item.finished:
            self.finished = True
        return item

    def _coalesce(self, first: RequestOutput) -> RequestOutput:
        """Merge the pending DELTA outputs behind ``first``; an abort or error behind them
        stays queued for the next call."""
        pending = [first]
        while not self._queue.empty() and not pending[-1].finished:
            item = self._queue._queue[0]  # type: ignore[attr-defined]  # peek at the deque
            if not isinstance(item, RequestOutput):
                break
            pending.append(self._queue.get_nowait())
        return merge_delta_outputs(pending)


class AsyncLLMEngine:
    """Thread-backed async front of ``LLMEngine`` (see the module docstring)."""

    def __init__(self, engine: LLMEngine, log_requests: bool = True,
                 max_log_len: int | None = None) -> None:
        self.engine = engine
        self._tokenizer_pool = getattr(getattr(engine, "inputs", None), "pool", None)
        self._init_front(log_requests, max_log_len)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._pending_adds: dict[str, tuple] = {}  # engine thread: adds whose compile runs
        self._thread: threading.Thread | None = None
        self._stop = False
        # OpenMP's thread count is per OS thread: a new thread would run torch single-threaded.
        self._num_torch_threads = torch.get_num_threads()
        self.num_steps = 0
        self.step_time_s = 0.0  # wall time inside step(): the rest of the loop is overhead

    def _init_front(self, log_requests: bool, max_log_len: int | None) -> None:
        """State of the asyncio side, the same for every engine behind it."""
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.stat_listeners: list[StatListener] = []
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_step_errors = 0
        self.last_step_error: str | None = None

    @classmethod
    def from_engine_args(cls, engine_args, log_requests: bool | None = None,
                         max_log_len: int | None = None) -> "AsyncLLMEngine":
        engine = LLMEngine.from_engine_args(engine_args)
        if log_requests is None:
            log_requests = not engine.config.observability.disable_log_requests
        return cls(engine, log_requests=log_requests, max_log_len=max_log_len)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread, bound to the running asyncio loop (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then the executor (tp/pp workers, Ray actors)."""
        if self._stop:
            return
        self._stop = True
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop ``start()`` bound the engine to: set before any request, call or
        engine-thread callback can need it."""
        assert self._loop is not None, "start() binds the loop first"
        return self._loop

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stop
                and getattr(getattr(self.engine, "executor", None), "healthy", True))

    def dead_cause(self) -> str:
        """Why the engine is not running, for the log line of a server that exits."""
        if self._thread is not None and not self._thread.is_alive():
            return "the engine thread stopped"
        if not getattr(getattr(self.engine, "executor", None), "healthy", True):
            return "a worker of the executor died"
        return "the engine was shut down"

    # ---- asyncio side --------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptInputs,
                          params: SamplingParams | PoolingParams,
                          arrival_time: float | None = None, priority: int = 0,
                          prompt_adapter_request=None,
                          trace_headers: dict[str, str] | None = None,
                          lora_request=None) -> RequestStream:
        """Queue a request and return its output stream; ValueError if the engine rejects it."""
        self.start()
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        arrival_time = time.time() if arrival_time is None else arrival_time
        # with --tokenizer-pool-size, text is tokenized here by the pool, not by the engine
        if lora_request is None:  # an adapter's text may need its own tokenizer
            prompt = await pretokenize(self._tokenizer_pool, prompt)
        stream = RequestStream(request_id, RequestStats(
            request_id, arrival_time, params,
            lora_name=lora_request.lora_name if lora_request is not None else None))
        self._streams[request_id] = stream
        done = self._bound_loop().create_future()
        self._commands.put(("add", request_id, prompt, params, arrival_time, priority, done,
                            stream.stats, prompt_adapter_request, trace_headers, lora_request))
        try:
            await done
        except BaseException:
            self._streams.pop(request_id, None)
            if done.cancelled():  # the caller went away while the engine thread was adding it
                self._commands.put(("abort", request_id))
            raise
        if self.log_requests:
            self._log_received(request_id, prompt, params)
        return stream

    async def generate(self, prompt: PromptInputs, params: SamplingParams, request_id: str,
                       priority: int = 0,
                       prompt_adapter_request=None,
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; leaving early (or a disconnect) aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority=priority,
                                        prompt_adapter_request=prompt_adapter_request,
                                        lora_request=lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def encode(self, prompt: PromptInputs, params: PoolingParams, request_id: str,
                     lora_request=None, trace_headers: dict[str, str] | None = None,
                     priority: int = 0) -> AsyncIterator[EmbeddingRequestOutput]:
        """vLLM 0.6.3's ``encode``: a pooling request's one output (embedding models);
        leaving early (or a disconnect) aborts it."""
        stream = await self.add_request(request_id, prompt, params, priority=priority,
                                        trace_headers=trace_headers, lora_request=lora_request)
        try:
            async for output in stream:
                yield output  # type: ignore[misc]  # a pooling stream's one output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (e.g. the client went away): the engine frees its KV blocks.

        Synchronous and safe to call from ``finally`` blocks during cancellation.
        """
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        if not stream.finished:
            stream.put(_ABORTED)
            self._notify(stream.stats, None, 0)
        self._abort_in_engine(request_id)
        if self.log_requests:
            logger.info("Aborted request %s.", request_id)

    def _abort_in_engine(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call_core(self, method: str, *args):
        """Run ``EngineCore.<method>(*args)`` between steps, where the core lives (here: the
        engine thread); its result, or its exception raised here. For utilities such as
        profiling or adapter management, never on the per-token path."""
        self.start()
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        done = self._bound_loop().create_future()
        self._commands.put(("call", done, method, args))
        return await done

    def fail_all(self, exc: BaseException) -> None:
        """Runs on the loop: end every open stream with ``exc`` (the engine is gone)."""
        self._fail(list(self._streams), exc)

    def _log_received(self, request_id: str, prompt: PromptInputs,
                      params: SamplingParams | PoolingParams):
        text: PromptInputs | None = prompt
        ids: list[int] | None = None
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        elif isinstance(prompt, list):
            text, ids = None, prompt
        if self.max_log_len is not None:
            text = text[:self.max_log_len] if isinstance(text, str) else text
            ids = ids[:self.max_log_len] if ids is not None else None
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s.",
                    request_id, text, params, ids)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Runs on the loop: route one step's outputs to their streams."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(output)
            self._notify(stream.stats, output, stream.stats.count_new_tokens(output))
            if output.finished:
                del self._streams[output.request_id]
                if self.log_requests:
                    logger.info("Finished request %s.", output.request_id)

    def _notify(self, stats: RequestStats, output: RequestOutput | None, num_new: int) -> None:
        now = time.time()
        if num_new:
            stats.first_token_time = stats.first_token_time or now
            stats.last_token_time = now
        if isinstance(output, EmbeddingRequestOutput):
            stats.finish_reasons = ["stop"]  # its prompt ran: the request is complete
        elif output is not None and output.finished:
            stats.finish_reasons = [c.finish_reason or "abort" for c in output.outputs]
        for listener in self.stat_listeners:
            try:
                listener(stats, output, num_new)
            except Exception:  # noqa: BLE001 - a metrics bug must not break serving
                logger.exception("stat listener failed")

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        """Runs on the loop: end these requests' streams with ``exc``."""
        for req_id in request_ids:
            stream = self._streams.pop(req_id, None)
            if stream is not None:
                stream.put(exc)
                self._notify(stream.stats, None, 0)

    # ---- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._num_torch_threads)
        while not self._stop:
            busy = self.engine.has_unfinished_requests()
            pending = bool(self._pending_adds)  # guided compiles: look again soon
            if not self._drain_commands(block=not busy,
                                        timeout=_PENDING_WAIT_S if pending else _IDLE_WAIT_S):
                break
            if self._pending_adds:
                self._finish_pending()
            if self.engine.has_unfinished_requests():
                self._step()
        logger.info("engine loop stopped after %d steps, %.2f s inside step()", self.num_steps,
                    self.step_time_s)

    def _drain_commands(self, block: bool, timeout: float = 1.0) -> bool:
        """Apply queued adds/aborts; wait for one first if ``block``. False on stop."""
        try:
            command = self._commands.get(timeout=timeout) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return not self._stop
        while True:
            if command[0] == "stop":
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            self._pending_adds.pop(command[1], None)
            return
        if command[0] == "call":
            _, done, method, args = command
            try:
                result = getattr(self.engine.core, method)(*args)
            except Exception as exc:  # noqa: BLE001 - raised in the caller
                self._call_soon(_settle_value, done, exc, None)
            else:
                self._call_soon(_settle_value, done, None, result)
            return
        _, req_id, prompt, params, arrival_time, priority, done, stats, adapter, trace, lora = \
            command
        if done.cancelled():
            return
        # a guided constraint compiles off this thread where the engine can (submit_request)
        add = getattr(self.engine, "submit_request", self.engine.add_request)
        try:
            request = add(req_id, prompt, params, arrival_time, priority,
                          prompt_adapter_request=adapter, trace_headers=trace, lora_request=lora)
        except Exception as exc:  # noqa: BLE001 - every rejection goes back to the caller
            self._settle_add(done, stats, None, exc)
            return
        if request is None:
            self._pending_adds[req_id] = (done, stats)
            return
        self._settle_add(done, stats, request, None)

    def _finish_pending(self) -> None:
        for req_id, request, exc in self.engine.finish_pending():
            done, stats = self._pending_adds.pop(req_id)
            self._settle_add(done, stats, request, exc)

    def _settle_add(self, done, stats: RequestStats, request, exc) -> None:
        if exc is not None:
            self._call_soon(_settle, done, exc if isinstance(exc, ValueError) else
                            ValueError(str(exc)))
            return
        # set here, before any output of this request can be dispatched to the loop
        stats.num_prompt_tokens = request.num_prompt_tokens
        self._call_soon(_settle, done, None)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the in-flight requests, keep serving
            logger.exception("engine step failed; failing the in-flight requests")
            self.num_step_errors += 1
            self.last_step_error = repr(exc)
            req_ids = self.engine.request_ids()
            try:
                self.engine.abort_request(req_ids)
                core = getattr(self.engine, "core", None)
                if core is not None:  # free what the failed batches still held
                    core.fail_all()
            except Exception:  # noqa: BLE001
                logger.exception("aborting after a failed step also failed")
            self._call_soon(self._fail, req_ids, EngineStepError(f"engine step failed: {exc!r}"))
            return
        finally:
            self.num_steps += 1
            self.step_time_s += time.perf_counter() - start
        if outputs:
            self._call_soon(self._dispatch, outputs)

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        try:
            self._bound_loop().call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._stop = True

    # ---- stats for metrics ---------------------------------------------------------------
    def get_stats(self) -> dict[str, float]:
        """Scheduler queues and KV usage, read without stopping the engine thread."""
        stats = self.engine.core.get_stats()
        stats.update(num_streams=len(self._streams), num_step_errors=self.num_step_errors,
                     num_steps=self.num_steps, step_time_s=self.step_time_s)
        return stats

    @property
    def config(self):
        return self.engine.config

    def cache_info(self) -> dict:
        return self.engine.core.cache_info()


def _settle_value(future: asyncio.Future, exc: BaseException | None, value) -> None:
    """Runs on the loop: complete a caller's future (unless it gave up meanwhile)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    _settle_value(future, exc, None)
