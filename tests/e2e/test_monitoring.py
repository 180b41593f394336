"""examples/grafana and examples/prometheus against a real server: every metric the Grafana
dashboard's PromQL queries is a sample name of /metrics (histograms as _bucket/_sum/_count,
counters as _total), and the model_name variable finds the served model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "examples" / "grafana" / "pagedllm-dashboard.json"
PROMETHEUS = REPO / "examples" / "prometheus" / "prometheus.yml"
METRIC_RE = re.compile(r"\bvllm:[A-Za-z0-9_:]+")
# spec-decode metrics exist only with --speculative-model, so the server runs ngram drafting
SPEC_ARGS = ["--speculative-model", "[ngram]", "--num-speculative-tokens", "3",
             "--ngram-prompt-lookup-max", "2"]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def _sample_labels(text: str) -> dict[str, list[str]]:
    """Sample name -> its label strings, from the Prometheus text format."""
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^([^#{\s]+)(\{[^}]*\})?\s+\S+$", line)
        if match:
            samples.setdefault(match.group(1), []).append(match.group(2) or "")
    return samples


@pytest.fixture(scope="module")
def metrics_text():
    with RemoteServer(str(build_tiny_model("llama")), ["--max-model-len", "128",
                                                        "--served-model-name", "tiny-llama",
                                                        *SPEC_ARGS]) as server:
        body = {"model": "tiny-llama", "prompt": "a b a b a b a b", "max_tokens": 8,
                "temperature": 0}
        resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        yield httpx.get(f"{server.url}/metrics", timeout=10).text


def test_dashboard_queries_are_real_promql_over_vllm_metrics():
    """The oracle is not vacuous: panels query the metrics the dashboard promises."""
    names = {m for expr in _dashboard_queries() for m in METRIC_RE.findall(expr)}
    for expected in ("vllm:num_requests_running", "vllm:gpu_cache_usage_perc",
                     "vllm:time_to_first_token_seconds_bucket",
                     "vllm:generation_tokens_total", "vllm:spec_decode_draft_acceptance_rate"):
        assert expected in names
    assert all('model_name="$model_name"' in e for e in _dashboard_queries()
               if not e.startswith("label_values"))


def test_every_dashboard_metric_is_exported(metrics_text):
    samples = _sample_labels(metrics_text)
    wanted = {m for expr in _dashboard_queries() for m in METRIC_RE.findall(expr)}
    missing = sorted(wanted - set(samples))
    assert not missing, f"dashboard queries metrics /metrics lacks: {missing}"


def test_model_name_variable_finds_the_served_model(metrics_text):
    samples = _sample_labels(metrics_text)
    assert any('model_name="tiny-llama"' in labels
               for labels in samples["vllm:num_requests_running"])


def test_prometheus_config_scrapes_metrics_path():
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert all(re.fullmatch(r"[\w.-]+:\d+", t) for c in job["static_configs"]
               for t in c["targets"])
