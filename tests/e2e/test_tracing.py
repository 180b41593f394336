"""OpenTelemetry request spans (--otlp-traces-endpoint): a local OTLP/HTTP receiver on the
loopback decodes what the engine exports (the oracle: the requests' own counts and ids),
offline and through the server with a caller's traceparent."""
import importlib.util
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest)

from pagedllm import LLM, SamplingParams  # noqa: E402
from tests.utils.tiny_models import build_tiny_model  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class _Receiver:
    """OTLP/HTTP trace receiver: POST /v1/traces bodies, decoded into spans."""

    def __init__(self) -> None:
        spans = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.spans)


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


@pytest.fixture
def receiver(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms
    rec = _Receiver()
    yield rec
    rec.server.shutdown()


def test_offline_requests_export_one_span_each(receiver):
    path = str(build_tiny_model("llama"))
    llm = LLM(model=path, otlp_traces_endpoint=receiver.url, collect_detailed_traces="all",
              served_model_name=["tiny"])
    params = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["The for statement", "A list is"], params, use_tqdm=False)
    engine = llm.llm_engine
    engine.add_request("traced", {"prompt": "x = 1"}, params, trace_headers={
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.tracer.flush()
    spans = {(_attrs(s)["gen_ai.request.id"]): s for s in receiver.wait_for(3)}
    assert sorted(spans) == sorted([o.request_id for o in outs] + ["traced"])
    for out in outs:
        span = spans[out.request_id]
        a = _attrs(span)
        assert span.name == "llm_request" and span.kind == span.SPAN_KIND_SERVER
        assert a["gen_ai.response.model"] == "tiny"
        assert a["gen_ai.usage.prompt_tokens"] == len(out.prompt_token_ids)
        assert a["gen_ai.usage.completion_tokens"] == 6 and a["gen_ai.request.max_tokens"] == 6
        assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.n"] == 1
        assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
        assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"]
        assert a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
        assert 0 < a["gen_ai.latency.time_in_model_forward"] <= \
            a["gen_ai.latency.time_in_model_execute"] <= a["gen_ai.latency.e2e"]
        assert a["gen_ai.latency.time_in_scheduler"] > 0
        assert span.end_time_unix_nano - span.start_time_unix_nano == \
            pytest.approx(a["gen_ai.latency.e2e"] * 1e9, rel=1e-3)
    traced = spans["traced"]  # continues the caller's trace
    assert traced.trace_id.hex() == TRACE_ID and traced.parent_span_id.hex() == PARENT_ID
    assert not spans[outs[0].request_id].parent_span_id


def test_server_continues_the_callers_trace(receiver):
    import httpx

    from tests.utils.server import RemoteServer
    path = str(build_tiny_model("llama"))
    with RemoteServer(path, ["--max-model-len", "128", "--otlp-traces-endpoint",
                             receiver.url]) as server:
        resp = httpx.post(f"{server.url}/v1/completions", json={
            "model": path, "prompt": "The for statement", "max_tokens": 4},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, timeout=60)
        assert resp.status_code == 200
        spans = receiver.wait_for(1)
    assert len(spans) == 1
    assert spans[0].trace_id.hex() == TRACE_ID and spans[0].parent_span_id.hex() == PARENT_ID
    assert _attrs(spans[0])["gen_ai.usage.completion_tokens"] == \
        resp.json()["usage"]["completion_tokens"]


def test_tracing_flags_fail_clearly(monkeypatch):
    from pagedllm.arg_utils import EngineArgs
    with pytest.raises(ValueError, match="needs --otlp-traces-endpoint"):
        EngineArgs(model="pagedllm/demo_model",
                   collect_detailed_traces="model").create_engine_config()
    with pytest.raises(ValueError, match="invalid; choose from model, worker, all"):
        EngineArgs(model="pagedllm/demo_model", otlp_traces_endpoint="http://127.0.0.1:1",
                   collect_detailed_traces="model,gpu").create_engine_config()
    from pagedllm.tracing import RequestTracer
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")
    with pytest.raises(ValueError, match="not supported; supported: grpc, http/protobuf"):
        RequestTracer("http://127.0.0.1:1", "m")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")  # grpc, vLLM's default
        with pytest.raises(ValueError, match="opentelemetry-exporter-otlp-proto-grpc"):
            RequestTracer("http://127.0.0.1:1", "m")
