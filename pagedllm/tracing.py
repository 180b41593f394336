"""OpenTelemetry request spans (``--otlp-traces-endpoint``), as vLLM 0.6.3 sends them.

Each finished request gives one span ``llm_request`` (kind SERVER) from its arrival to its
end, a child of the caller's trace when the HTTP request carried ``traceparent`` /
``tracestate`` headers, with vLLM's ``gen_ai.*`` attributes: request id, model, sampling
fields, prompt and completion tokens, time in queue, time to first token, end-to-end
latency, time in the scheduler and, with ``--collect-detailed-traces model|worker|all``, the
time in the model forward and in model execution. Spans go out through the OTLP exporter
that ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` names (``grpc``, vLLM's default, or
``http/protobuf``), batched in the background. Needs ``pip install 'pagedllm[tracing]'``.
"""
from __future__ import annotations

import os
from typing import Mapping

DETAILED_CHOICES = ("model", "worker", "all")


def check_tracing_flags(endpoint: str | None, detailed: str | None) -> tuple[bool, bool]:
    """Validate the two flags; (collect forward time, collect execute time)."""
    if detailed is None:
        return False, False
    if endpoint is None:
        raise ValueError("--collect-detailed-traces needs --otlp-traces-endpoint")
    parts = {p.strip() for p in detailed.split(",")}
    bad = parts - set(DETAILED_CHOICES)
    if bad:
        raise ValueError(f"--collect-detailed-traces {detailed!r}: {sorted(bad)} invalid; "
                         f"choose from {', '.join(DETAILED_CHOICES)} (comma-separated)")
    return bool(parts & {"model", "all"}), bool(parts & {"worker", "all"})


class RequestTracer:
    """Makes and exports the spans; one per engine."""

    def __init__(self, endpoint: str, model_name: str) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ValueError("--otlp-traces-endpoint needs OpenTelemetry: pip install "
                             "'pagedllm[tracing]'") from exc
        self.provider = TracerProvider(resource=Resource.create({"service.name": "pagedllm"}))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self.tracer = self.provider.get_tracer("pagedllm")
        self.model_name = model_name

    def request_finished(self, group, headers: Mapping[str, str] | None, now: float) -> None:
        """One span for a finished ``SequenceGroup`` (times are ``time.time()`` seconds)."""
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        context = TraceContextTextMapPropagator().extract(dict(headers)) if headers else None
        first = group.seqs[0].request
        params = group.params
        span = self.tracer.start_span("llm_request", context=context, kind=SpanKind.SERVER,
                                      start_time=int(first.arrival_time * 1e9))
        attributes = {
            "gen_ai.response.model": self.model_name,
            "gen_ai.request.id": group.request_id,
            "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p,
            "gen_ai.request.max_tokens": first.max_tokens,
            "gen_ai.request.best_of": params.best_of,
            "gen_ai.request.n": params.n,
            "gen_ai.usage.num_sequences": len(group.seqs),
            "gen_ai.usage.prompt_tokens": first.num_prompt_tokens,
            "gen_ai.usage.completion_tokens": sum(s.request.num_output_tokens
                                                   for s in group.seqs),
            "gen_ai.latency.e2e": now - first.arrival_time,
            "gen_ai.latency.time_in_scheduler": sum(s.request.scheduler_time
                                                    for s in group.seqs),
        }
        if first.first_scheduled_time is not None:
            attributes["gen_ai.latency.time_in_queue"] = \
                first.first_scheduled_time - first.arrival_time
        if first.first_token_time is not None:
            attributes["gen_ai.latency.time_to_first_token"] = \
                first.first_token_time - first.arrival_time
        if first.model_forward_time is not None:
            attributes["gen_ai.latency.time_in_model_forward"] = first.model_forward_time
        if first.model_execute_time is not None:
            attributes["gen_ai.latency.time_in_model_execute"] = first.model_execute_time
        span.set_attributes(attributes)
        span.end(end_time=int(now * 1e9))

    def flush(self, timeout_ms: int = 10000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _exporter(endpoint: str):
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError(
                "--otlp-traces-endpoint with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc (the "
                "default) needs pip install opentelemetry-exporter-otlp-proto-grpc; or set "
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf") from exc
        return OTLPSpanExporter(endpoint=endpoint)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint)
    raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL {protocol!r} is not supported; "
                     "supported: grpc, http/protobuf")


def trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The W3C trace-context headers of an incoming HTTP request, if any."""
    found = {k: v for k, v in ((k.lower(), v) for k, v in headers.items())
             if k in ("traceparent", "tracestate")}
    return found or None
