"""Results of ``pagedllm bench``: percentile summaries, the JSON file and the PNG chart.

A result is ``{"benchmark": ..., "summary": {...}, "samples": {...}}``: the summary is what
is printed and compared across runs; the samples (per-request seconds, finish times) are
kept so that a chart or a later analysis needs no re-run.
"""
from __future__ import annotations

import json
import statistics
import sys
from typing import Optional

PERCENTILES = (10, 25, 50, 75, 90, 99)
_THROUGHPUT_BINS = 20


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (the convention of benchmarks/serving.py)."""
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def distribution_ms(values_s: list[float]) -> dict[str, float]:
    """Mean, median and percentiles in milliseconds of a list of seconds (zeros when empty)."""
    if not values_s:
        return {"mean": 0.0, "median": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    ordered = sorted(values_s)
    out = {"mean": statistics.fmean(ordered) * 1000, "median": statistics.median(ordered) * 1000}
    out.update({f"p{p}": percentile(ordered, p) * 1000 for p in PERCENTILES})
    return {k: round(v, 3) for k, v in out.items()}


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def throughput_over_time(finish_s: list[float], tokens: list[int],
                         bins: int = _THROUGHPUT_BINS) -> tuple[list[float], list[float]]:
    """(bin centres in s, output tokens/s finished in each bin): a request's tokens count in
    the bin where it finished, so the curve integrates to the total output tokens."""
    if not finish_s:
        return [], []
    width = max(max(finish_s), 1e-6) / bins
    totals = [0.0] * bins
    for t, n in zip(finish_s, tokens):
        totals[min(int(t / width), bins - 1)] += n
    return [(i + 0.5) * width for i in range(bins)], [n / width for n in totals]


def _panels(samples: dict) -> list[tuple[str, str, object]]:
    """(title, kind, data) of each chart the samples allow."""
    panels = []
    for key, title in (("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"),
                       ("latency_s", "Request latency (ms)")):
        if samples.get(key):
            panels.append((title, "hist", [v * 1000 for v in samples[key]]))
    if samples.get("finish_s"):
        panels.append(("Output tokens/s over time (s)", "line",
                       throughput_over_time(samples["finish_s"], samples["tokens"])))
    return panels


def plot(path: str, result: dict) -> Optional[str]:
    """Write the PNG chart; returns None, or why no chart was written (no matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or 'pagedllm[bench]'); no chart written")
    panels = _panels(result.get("samples", {}))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4),
                             squeeze=False)
    for ax, (title, kind, data) in zip(axes[0], panels):
        if kind == "hist":
            ax.hist(data, bins=30)
            ax.set_ylabel("requests")
        else:
            ax.plot(*data, marker="o")
        ax.set_title(title)
    fig.suptitle(f"pagedllm bench {result.get('benchmark', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def finish(result: dict, output_json: Optional[str], plot_path: Optional[str]) -> None:
    """Print the summary, then write the JSON and the chart where asked."""
    print(json.dumps(result["summary"], indent=2), flush=True)
    if output_json:
        write_json(output_json, result)
        print(f"results written to {output_json}")
    if plot_path:
        problem = plot(plot_path, result)
        print(problem or f"chart written to {plot_path}", file=sys.stderr if problem else
              sys.stdout)
