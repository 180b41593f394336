"""``AsyncMPLLMEngine``: the async engine of ``pagedllm serve`` with the core in its own process.

The API-server process keeps the front end: tokenizer, request checks (``prepare_request``),
the ``OutputProcessor`` (detokenization, stop strings, outputs), one ``RequestStream`` per
request and the metrics listeners. The core process (``engine/core_client.py``) schedules and
runs the model. One reader task on the asyncio loop takes the core's messages in order: adds
are acknowledged (a rejection is the caller's ValueError), each step's deltas become outputs
on their streams, and a stop string found here goes back as an abort. The interface is
``AsyncLLMEngine``'s (``add_request``, ``generate``, ``abort``, ``get_stats``), so the serving
code does not know which engine it has; ``--disable-frontend-multiprocessing`` picks the
in-process one.

If the core process dies, every open stream fails with ``EngineDeadError`` at once (the reader
checks the process between messages, at least every ``_WATCH_MS``) and ``is_running`` turns
False; the server's watchdog then answers /health with 500 and exits.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
import logging
import time

from pagedllm.engine.async_engine import (AsyncLLMEngine, EngineDeadError, EngineStepError,
                                          RequestStats, RequestStream)
from pagedllm.engine.core_client import MPCoreClient
from pagedllm.engine.engine import make_tracer
from pagedllm.engine.inputs import PromptInputs, PromptProcessor
from pagedllm.engine.output_processor import OutputProcessor, prepare_request
from pagedllm.engine.timeline import Timeline
from pagedllm.engine.tokenizer_pool import pretokenize
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

logger = logging.getLogger("pagedllm.engine.async_mp")

_WATCH_MS = 200  # the reader checks that the core process lives at least this often
_MAX_DRAIN = 64  # most queued messages the reader handles before the streams get a turn


class AsyncMPLLMEngine(AsyncLLMEngine):
    """Same interface as ``AsyncLLMEngine``; the core runs in a child process."""

    def __init__(self, config: EngineConfig, log_requests: bool = True,
                 max_log_len: int | None = None,
                 log_stats: bool | None = None, wait: bool = True,
                 client: MPCoreClient | None = None) -> None:
        """Starts the core process first (or takes ``client``, started and configured before
        this process resolved ``config``), so that the model loads there while this process
        loads its tokenizer; ``wait=False`` leaves ``wait_ready()`` to the caller (the server
        builds its app meanwhile)."""
        self._init_front(log_requests, max_log_len)
        self._config = config
        self._start_time = time.perf_counter()
        if client is None:
            client = MPCoreClient()
        self.client = client
        if not client.configured:
            client.configure(config, log_stats)
        try:
            self.inputs = PromptProcessor(config.model, config.tokenizer_pool)
        except BaseException:
            self.client.shutdown()
            raise
        self._tokenizer_pool = self.inputs.pool
        self.output_processor = OutputProcessor(self.inputs.tokenizer,
                                                self.inputs.max_model_len, make_tracer(config),
                                                self.inputs.lora_tokenizers)
        self._per_token = config.scheduler.multi_step_stream_outputs
        self._acks: dict[str, tuple[asyncio.Future, RequestStats]] = {}
        self._calls: dict[int, asyncio.Future] = {}  # call_core() answers still to come
        self._num_calls = 0
        self._core_stats: dict = {}
        self._reader: asyncio.Task | None = None
        self._dead: str | None = None
        self._stop = False
        self.num_steps = 0
        self.output_time_s = 0.0  # front end: turning the core's deltas into outputs
        self.timeline = Timeline.create("front")  # PAGEDLLM_STEP_TIMELINE
        if wait:
            self.wait_ready()

    @classmethod
    def from_engine_args(cls, engine_args, log_requests: bool | None = None,
                         max_log_len: int | None = None, wait: bool = True,
                         client: MPCoreClient | None = None) -> "AsyncMPLLMEngine":
        """``client``: a core process started earlier (``pagedllm serve`` starts it before
        its own imports, and hands it the arguments and the resolved configuration with
        ``start_with_args`` before importing the server)."""
        client = client or MPCoreClient()
        config = client.config or client.start_with_args(engine_args)
        if log_requests is None:
            log_requests = not config.observability.disable_log_requests
        return cls(config, log_requests=log_requests, max_log_len=max_log_len, wait=wait,
                   client=client)

    def wait_ready(self) -> None:
        """Block until the core process has loaded the model (RuntimeError if it failed)."""
        try:
            self.client.wait_ready()
        except BaseException:
            self.client.shutdown()
            raise
        logger.info("engine core process %d ready in %.1f s", self.client.proc.pid,
                    time.perf_counter() - self._start_time)

    @property
    def config(self):
        return self._config

    def cache_info(self) -> dict:
        return dict(self.client.cache_info)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._reader is None:
            self._loop = asyncio.get_running_loop()
            self._reader = self._loop.create_task(self._read_loop(), name="pagedllm-core-reader")

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stop:
            return
        self._stop = True
        if self._reader is not None:
            self._reader.cancel()
        self.client.shutdown(timeout)
        if self.timeline is not None:
            logger.info("front-end timeline written to %s", self.timeline.save())
        logger.info("front end: %d steps, %.2f s making outputs, %.2f s unpickling",
                    self.num_steps, self.output_time_s, self.client.recv_s)

    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._stop and self.client.is_alive()

    def dead_cause(self) -> str:
        if self._dead is not None:
            return self._dead
        if not self.client.is_alive():
            return self.client.exit_cause()
        return "the engine was shut down"

    # ---- requests ------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptInputs,
                          params: SamplingParams | PoolingParams,
                          arrival_time: float | None = None, priority: int = 0,
                          prompt_adapter_request=None,
                          trace_headers: dict[str, str] | None = None,
                          lora_request=None) -> RequestStream:
        """Queue a request and return its output stream; ValueError if it is rejected (here
        or by the core)."""
        self.start()
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_cause()}")
        if request_id in self._streams or request_id in self.output_processor.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if lora_request is None:  # an adapter's text may need its own tokenizer
            prompt = await pretokenize(self._tokenizer_pool, prompt)
        text, core_request = prepare_request(
            self._config, self.inputs, request_id, prompt, params, arrival_time, priority,
            prompt_adapter_request, lora_request)
        stats = RequestStats(request_id, core_request.arrival_time, params,
                             lora_name=lora_request.lora_name if lora_request else None)
        self.output_processor.add(text, core_request, trace_headers)
        stream = RequestStream(request_id, stats)
        self._streams[request_id] = stream
        done = self._bound_loop().create_future()
        self._acks[request_id] = (done, stats)
        try:
            self.client.add_request(core_request)
            await done
        except BaseException:
            self._acks.pop(request_id, None)
            self._streams.pop(request_id, None)
            self.client.abort(self.output_processor.remove(request_id))
            raise
        if self.log_requests:
            self._log_received(request_id, prompt, params)
        return stream

    def _abort_in_engine(self, request_id: str) -> None:
        self.client.abort(self.output_processor.remove(request_id))

    async def call_core(self, method: str, *args):
        """Run ``EngineCore.<method>(*args)`` in the core process between steps; its
        result (picklable), or RuntimeError with the core's error text."""
        self.start()
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_cause()}")
        self._num_calls += 1
        call_id = self._num_calls
        done = self._bound_loop().create_future()
        self._calls[call_id] = done
        try:
            self.client.send(("call", call_id, method, args))
            return await done
        finally:
            self._calls.pop(call_id, None)

    # ---- the reader ----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while not self._stop:
                message = await self.client.recv(_WATCH_MS)
                if message is None:
                    if not self.client.is_alive():
                        self._engine_died(self.client.exit_cause())
                        return
                    continue
                self._handle(message)
                self._drain_queued()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a reader bug must not hang clients
            logger.exception("the engine-core reader failed")
            self._engine_died(f"the engine-core reader failed: {exc!r}")

    def _drain_queued(self) -> None:
        """Handle every message already queued before the loop runs the stream writers: when
        the front end falls behind, each stream then sends the tokens of several steps as one
        chunk (its pending DELTA outputs merge) instead of one chunk per step, so the backlog
        shrinks instead of growing (measured on the H100: the front end lagged the core by
        0.4 s median, 1.3 s p99, and the last tokens reached clients 1.9 s after the core's
        last step)."""
        for _ in range(_MAX_DRAIN):
            message = self.client.recv_nowait()
            if message is None:
                return
            self._handle(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            self._on_step(message[1], message[2], message[3])
        elif kind == "stats":
            self._core_stats = message[1]
        elif kind == "result":
            done = self._calls.get(message[1])
            if done is not None and not done.done():
                if message[2] is not None:
                    done.set_exception(RuntimeError(message[2]))
                else:
                    done.set_result(message[3])
        elif kind == "acks":
            for request_id, error, prompt_ids in message[1]:
                self._on_ack(request_id, error, prompt_ids)
        elif kind == "failed":
            self._on_failed(message[1], message[2])
        elif kind == "fatal":
            self._engine_died(f"the engine core failed:\n{message[1]}")

    def _on_step(self, deltas, stats: dict, sent: float) -> None:
        start = time.perf_counter()
        self._core_stats = stats
        self.num_steps += 1
        outputs, stopped = self.output_processor.process(deltas, self._per_token)
        self.client.abort(stopped)  # stop strings: the core must not run these further
        self._dispatch(outputs)
        spent = time.perf_counter() - start
        self.output_time_s += spent
        if self.timeline is not None:  # (time handled, time the core sent it, seconds, deltas)
            self.timeline.add("step", sent, spent, len(deltas))

    def _on_ack(self, request_id: str, error: str | None, prompt_ids) -> None:
        ack = self._acks.pop(request_id, None)
        if ack is None or ack[0].done():
            return
        done, stats = ack
        if error is not None:
            self.output_processor.remove(request_id)
            done.set_exception(ValueError(error))
            return
        group = self.output_processor.groups.get(request_id)
        if group is not None:
            if prompt_ids is not None:
                group.set_prompt_token_ids(prompt_ids)
            # set before any output of this request reaches the listeners
            stats.num_prompt_tokens = group.parent.num_prompt_tokens
        done.set_result(None)

    def _on_failed(self, seq_ids: list[str], text: str) -> None:
        self.num_step_errors += 1
        self.last_step_error = text
        request_ids = {request_id for s in seq_ids
                       if (request_id := self.output_processor.request_id_of(s)) is not None}
        for request_id in request_ids:
            self.output_processor.remove(request_id)
        self._fail(sorted(request_ids), EngineStepError(text))

    def _engine_died(self, cause: str) -> None:
        if self._dead is not None:
            return
        self._dead = cause
        logger.error("engine core died: %s; failing %d open request(s)", cause,
                     len(self._streams))
        error = EngineDeadError(f"the engine died: {cause}")
        for done in [d for d, _ in self._acks.values()] + list(self._calls.values()):
            if not done.done():
                done.set_exception(error)
        self._acks.clear()
        self.fail_all(error)

    # ---- stats ---------------------------------------------------------------------------
    def get_stats(self) -> dict[str, float]:
        """The core's stats of its last step (at most one step old) and the front end's."""
        stats = dict(self._core_stats) or _IDLE_STATS.copy()
        stats.update(num_streams=len(self._streams), num_step_errors=self.num_step_errors,
                     num_steps=self.num_steps, step_time_s=0.0)
        return stats


_IDLE_STATS = {
    "num_requests_running": 0, "num_requests_waiting": 0, "num_requests_swapped": 0,
    "gpu_cache_usage_perc": 0.0, "cpu_cache_usage_perc": 0.0, "gpu_prefix_cache_hit_rate": 0.0,
    "num_preemptions_total": 0, "spec_decode_enabled": False,
    "spec_decode_draft_acceptance_rate": 0.0, "spec_decode_efficiency": 0.0,
    "spec_decode_num_accepted_tokens_total": 0, "spec_decode_num_draft_tokens_total": 0,
    "spec_decode_num_emitted_tokens_total": 0,
}
