"""Prometheus metrics of the server, with vLLM 0.6.3's names and a ``model_name`` label.

Two sources, one registry per app (no global state):

* engine state (queues, KV usage, preemptions, cache config) is read at scrape time by
  ``_EngineCollector`` from ``AsyncLLMEngine.get_stats()``;
* request-level counters and histograms are fed by ``MetricsListener``, registered as a stat
  listener of the async engine (it sees every output and every finished/aborted request).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedllm.engine.async_engine import AsyncLLMEngine, RequestStats
from pagedllm.outputs import EmbeddingRequestOutput, RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
_E2E_BUCKETS = [1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineCollector:
    """Gauges and the preemption counter, read from the engine when Prometheus scrapes."""

    _GAUGES = {
        "num_requests_running": "Number of requests currently running.",
        "num_requests_waiting": "Number of requests waiting to be processed.",
        "num_requests_swapped": "Number of requests swapped to CPU.",
        "gpu_cache_usage_perc": "KV-cache usage (device blocks); 1 means 100 percent.",
        "cpu_cache_usage_perc": "KV-cache usage (CPU swap blocks); 1 means 100 percent.",
        "gpu_prefix_cache_hit_rate": "Prefix-cache block hit rate.",
    }

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.get_stats()
        for name, doc in self._GAUGES.items():
            family = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[name]))
            yield family
        family = CounterMetricFamily("vllm:num_preemptions", "Cumulative preemptions.",
                                     labels=["model_name"])
        family.add_metric([self.model_name], float(stats["num_preemptions_total"]))
        yield family
        if stats["spec_decode_enabled"]:  # --speculative-model: vLLM's spec_decode metrics
            yield from self._spec_decode(stats)
        yield self._cache_config_info()

    _SPEC_GAUGES = {"draft_acceptance_rate": "Speculative token acceptance rate.",
                    "efficiency": "Speculative decoding system efficiency."}
    _SPEC_COUNTERS = {"num_accepted_tokens": "Number of accepted tokens.",
                      "num_draft_tokens": "Number of draft tokens.",
                      "num_emitted_tokens": "Number of emitted tokens."}

    def _spec_decode(self, stats: dict):
        for name, doc in self._SPEC_GAUGES.items():
            family = GaugeMetricFamily(f"vllm:spec_decode_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[f"spec_decode_{name}"]))
            yield family
        for name, doc in self._SPEC_COUNTERS.items():
            family = CounterMetricFamily(f"vllm:spec_decode_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[f"spec_decode_{name}_total"]))
            yield family

    def _cache_config_info(self) -> GaugeMetricFamily:
        config, info = self.engine.config.cache, self.engine.cache_info()
        labels = {"block_size": config.block_size, "cache_dtype": config.kv_cache_dtype,
                  "enable_prefix_caching": config.enable_prefix_caching,
                  "gpu_memory_utilization": config.gpu_memory_utilization,
                  "num_gpu_blocks": info.get("num_gpu_blocks"),  # known once the core is up
                  "num_cpu_blocks": info.get("num_cpu_blocks"),
                  "swap_space": config.swap_space}
        family = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache "
                                   "config.", labels=list(labels))
        family.add_metric([str(v) for v in labels.values()], 1.0)
        return family


# vLLM 0.6.3 averages its throughput gauges over its 5 s logging interval.
_THROUGHPUT_WINDOW_S = 5.0


class _TokenRate:
    """Tokens per second over the last ``window`` seconds (or since start-up, if shorter):
    a sliding window, so that any number of scrapers read the same value."""

    def __init__(self, window: float = _THROUGHPUT_WINDOW_S) -> None:
        self.window, self.started = window, time.monotonic()
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # fed on the event loop, read by the scrape thread

    def add(self, num_tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), num_tokens))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._events and self._events[0][0] < now - self.window:
                self._events.popleft()
            total = sum(n for _, n in self._events)
        return total / max(min(self.window, now - self.started), 1e-3)


class ServerMetrics:
    """The app's registry and the request-level metrics; ``render()`` is the /metrics body.

    ``time_per_output_token_seconds`` is observed once per output token after a sequence's
    first (vLLM observes each decode step's latency): an output carrying k new tokens of the
    longest choice since the previous output spreads the time between them over k samples,
    so a non-streamed (FINAL_ONLY) request gives (tokens - 1) samples of its mean gap.
    """

    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        label, reg = ["model_name"], self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", label,
                                     registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens "
                                         "processed.", label, registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in "
                              "seconds.", label, buckets=_TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token in "
                              "seconds.", label, buckets=_TPOT_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency "
                             "in seconds.", label, buckets=_E2E_BUCKETS, registry=reg)
        len_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per finished request.", label,
            buckets=len_buckets, registry=reg)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Generation tokens per finished request.", label,
            buckets=len_buckets, registry=reg)
        self.request_params_n = Histogram("vllm:request_params_n", "The n parameter of "
                                          "finished requests.", label,
                                          buckets=[1, 2, 5, 10, 20], registry=reg)
        self.request_success = Counter("vllm:request_success", "Successfully finished "
                                       "requests.", ["model_name", "finished_reason"],
                                       registry=reg)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot,
                       self.e2e, self.request_prompt_tokens, self.request_generation_tokens,
                       self.request_params_n):
            metric.labels(model_name)  # export zero-valued samples from the start
        for reason in ("stop", "length"):
            self.request_success.labels(model_name, reason)
        self._add_gauges(engine, label)
        # pagedllm's own: requests per served model (the base model or a LoRA adapter's name),
        # counted when their first token came and when they ended (finished or aborted)
        per_model = ["model_name", "served_model_name"]
        self.model_started = Counter("pagedllm:model_requests_started", "Requests that "
                                     "produced a first token, per served model (base or "
                                     "LoRA adapter).", per_model, registry=reg)
        self.model_ended = Counter("pagedllm:model_requests_ended", "Requests that finished "
                                   "or were aborted, per served model.", per_model,
                                   registry=reg)
        self._started: set[str] = set()
        # request id -> (longest choice's tokens, engine time of its last token), for TPOT
        self._decode_seen: dict[str, tuple[int, float]] = {}
        engine.stat_listeners.append(self.on_output)

    def _add_gauges(self, engine: AsyncLLMEngine, label: list[str]) -> None:
        """vLLM's throughput gauges (fed by on_output) and its CPU prefix-cache hit rate, read
        from ``engine.get_stats()`` at scrape time: pagedllm's CPU blocks hold swapped-out
        requests only, never a prefix cache, which vLLM reports as -1."""
        self.prompt_rate, self.generation_rate = _TokenRate(), _TokenRate()
        for name, rate, doc in (
                ("vllm:avg_prompt_throughput_toks_per_s", self.prompt_rate,
                 "Average prefill throughput in tokens/s."),
                ("vllm:avg_generation_throughput_toks_per_s", self.generation_rate,
                 "Average generation throughput in tokens/s.")):
            Gauge(name, doc, label, registry=self.registry).labels(
                self.model_name).set_function(rate.rate)
        Gauge("vllm:cpu_prefix_cache_hit_rate", "CPU prefix cache block hit rate.", label,
              registry=self.registry).labels(self.model_name).set_function(
            lambda: float(engine.get_stats().get("cpu_prefix_cache_hit_rate", -1.0)))

    def on_output(self, stats: RequestStats, output: RequestOutput | None, num_new: int):
        name = self.model_name
        self._count_per_model(stats, output, num_new)
        # the prompt has been processed: a first token, or a pooling request's output
        if (num_new and stats.num_generation_tokens == num_new) or \
                isinstance(output, EmbeddingRequestOutput):
            self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
            self.prompt_rate.add(stats.num_prompt_tokens)
        if num_new:
            self.generation_tokens.labels(name).inc(num_new)
            self.generation_rate.add(num_new)
            self._observe_tpot(stats, output)
        if output is None or output.finished:
            self._decode_seen.pop(stats.request_id, None)
        if output is None or not output.finished:
            return
        metrics = output.metrics
        if metrics is not None and metrics.first_token_time is not None:
            self.ttft.labels(name).observe(metrics.first_token_time - metrics.arrival_time)
            end = metrics.finished_time or metrics.last_token_time
            self.e2e.labels(name).observe(end - metrics.arrival_time)
        self.request_prompt_tokens.labels(name).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(name).observe(stats.num_generation_tokens)
        self.request_params_n.labels(name).observe(getattr(stats.params, "n", 1))
        for reason in stats.finish_reasons:
            self.request_success.labels(name, reason).inc()

    def _count_per_model(self, stats: RequestStats, output: RequestOutput | None,
                         num_new: int) -> None:
        served = stats.lora_name or self.model_name
        if num_new and stats.request_id not in self._started:
            self._started.add(stats.request_id)
            self.model_started.labels(self.model_name, served).inc()
        if (output is None or output.finished) and stats.request_id in self._started:
            self._started.discard(stats.request_id)
            self.model_ended.labels(self.model_name, served).inc()

    def _observe_tpot(self, stats: RequestStats, output: RequestOutput | None) -> None:
        """One TPOT sample per token after the first of the longest choice (see the class
        docstring); times are the engine's when the output carries them."""
        metrics = output.metrics if output is not None else None
        now = metrics.last_token_time if metrics is not None else stats.last_token_time
        longest = stats.longest_completion
        seen = self._decode_seen.get(stats.request_id)
        if seen is None:  # this output holds the first token
            first = metrics.first_token_time if metrics is not None else None
            seen = (1, first if first is not None else (stats.first_token_time or now))
        num_tokens, span = longest - seen[0], now - seen[1]
        self._decode_seen[stats.request_id] = (longest, now)
        histogram = self.tpot.labels(self.model_name)
        for _ in range(max(num_tokens, 0)):
            histogram.observe(max(span, 0.0) / num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
