"""`pagedllm bench throughput | latency | serve` on CPU with the tiny model (short runs): the
JSON results agree with the workload, the chart is a PNG (or a clear message without
matplotlib), and benchmarks/*.py keep their flags."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from pagedllm.bench.report import plot, throughput_over_time
from pagedllm.cli import main
from tests.utils.tiny_models import build_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--input-len", "8", "--output-len", "6", "--max-model-len", "64"]


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_tiny_model("llama"))


def _run(tmp_path, argv: list[str]) -> dict:
    out = tmp_path / "result.json"
    assert main([*argv, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_json_and_plot(model, tmp_path):
    png = tmp_path / "tp.png"
    result = _run(tmp_path, ["bench", "throughput", model, "--num-prompts", "5", *SMALL,
                             "--plot", str(png)])
    summary, samples = result["summary"], result["samples"]
    assert samples["tokens"] == [6] * 5  # EOS ignored: every request runs to output-len
    # elapsed_s is rounded to 1 ms (a run of a few ms): tokens/s must fit its rounding interval
    elapsed, rate = summary["elapsed_s"], summary["output_tokens_per_s"]
    assert 30 / (elapsed + 0.0005) - 0.1 <= rate <= 30 / max(elapsed - 0.0005, 1e-6) + 0.1
    assert len(samples["ttft_s"]) == 5 and all(t > 0 for t in samples["ttft_s"])
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_latency_json(model, tmp_path):
    result = _run(tmp_path, ["bench", "latency", model, "--num-iters", "3",
                             "--num-iters-warmup", "1", *SMALL])
    latencies = result["samples"]["latency_s"]
    assert len(latencies) == 3
    assert result["summary"]["avg_latency_s"] == pytest.approx(statistics.fmean(latencies),
                                                               abs=1e-4)
    assert result["summary"]["batch_size"] == 1


def test_serve_starts_the_server_with_engine_flags(model, tmp_path):
    png = tmp_path / "serve.png"
    result = _run(tmp_path, ["bench", "serve", model, "--num-prompts", "4",
                             "--served-model-name", "bench-tiny", *SMALL, "--plot", str(png)])
    summary = result["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0, summary
    assert result["samples"]["tokens"] == [6] * 4
    assert summary["output_tokens_per_s"] == pytest.approx(24 / summary["duration_s"], rel=0.02)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    path = tmp_path / "none.png"
    message = plot(str(path), {"benchmark": "latency", "samples": {"latency_s": [0.1]}})
    assert "matplotlib" in message and "pip install" in message
    assert not path.exists()


def test_throughput_over_time_integrates_to_total_tokens():
    centres, rates = throughput_over_time([0.5, 1.0, 2.0, 3.9], [10, 20, 30, 40], bins=4)
    width = centres[1] - centres[0]
    assert sum(r * width for r in rates) == pytest.approx(100)
    # bins of 3.9 / 4 = 0.975 s: each finish time falls in its own bin
    assert [r * width for r in rates] == pytest.approx([10, 20, 30, 40])


def test_benchmark_scripts_keep_their_flags():
    sys.path.insert(0, "benchmarks")
    import serving
    args = serving._parse_args(["--compare-inproc", "--rates", "4", "8", "--client-processes",
                                "2", "--sweep-prompts", "10", "--compare-offline"])
    assert args.rates == [4.0, 8.0] and args.client_processes == 2
    assert args.sweep_prompts == 10 and args.compare_inproc and args.compare_offline
    import throughput
    assert callable(throughput.main) and callable(throughput.make_prompts)
