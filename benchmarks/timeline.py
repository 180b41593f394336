"""Where a serving run loses time against offline: read the timelines that
``benchmarks/serving.py --timeline DIR`` makes (``PAGEDLLM_STEP_TIMELINE``) and compare runs.

Per run (``DIR/server``: engine core in its own process, ``DIR/inproc``: the thread engine,
``DIR/offline``: ``LLM.generate``), over the main workload's window (the clients' first send to
their last byte; offline: the main batch's first add to its last step):

- ``ingest``: first send -> the core has the request; and how long until it has all of them;
- ``first step`` and ``full batch``: when the core first ran a step, and first ran as many
  requests at once as it ever does;
- ``steps``, ``step ms``: step count and median step interval;
- ``underfilled s``: time the core ran fewer requests than its peak while requests waited;
- ``stalls s``: step intervals beyond 3x the median (the core idle or blocked), summed;
- ``tail s``: the core's last step -> the clients' last byte (delivery lag);
- front end: lag from the core sending a step to the front end handling it (median, p99),
  and its busy share making outputs.

    python benchmarks/timeline.py DIR
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys


def _load(run_dir: str, role: str) -> dict:
    rows: dict = {}
    for path in glob.glob(os.path.join(run_dir, f"{role}-*.json")):
        with open(path) as f:
            for kind, values in json.load(f).items():
                rows.setdefault(kind, []).extend(values)
    for values in rows.values():
        values.sort()
    return rows


def _window(run_dir: str, core: dict, num_prompts: int) -> tuple[float, float]:
    client = os.path.join(run_dir, "client.json")
    if os.path.exists(client):
        with open(client) as f:
            rows = json.load(f)
        return min(r[0] for r in rows), max(r[1] for r in rows)
    adds = core.get("add", [])
    start = adds[-num_prompts][0] if len(adds) >= num_prompts else adds[0][0]
    return start, core["step"][-1][0]


def _underfilled(steps: list, peak: int) -> float:
    """Seconds of steps that ran fewer than ``peak`` requests while requests waited."""
    total = 0.0
    for prev, row in zip(steps, steps[1:]):
        if row[1] < peak and row[4] > 0:
            total += row[0] - prev[0]
    return total


def summarize_run(run_dir: str, num_prompts: int) -> dict:
    core = _load(run_dir, "core")
    if not core.get("step"):
        return {}
    start, end = _window(run_dir, core, num_prompts)
    steps = [r for r in core["step"] if start <= r[0] <= end + 1.0]
    adds = [r for r in core.get("add", []) if start - 0.01 <= r[0] <= end]
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    median = statistics.median(gaps) if gaps else 0.0
    peak = max(r[1] for r in steps)
    out = {
        "wall_s": end - start,
        "ingest_first_s": adds[0][0] - start if adds else None,
        "ingest_all_s": adds[-1][0] - start if adds else None,
        "first_step_s": steps[0][0] - start,
        "full_batch_s": next(r[0] for r in steps if r[1] == peak) - start,
        "steps": len(steps), "step_ms": 1000 * median, "peak_requests": peak,
        "underfilled_s": _underfilled(steps, peak),
        "stalls_s": sum(g - median for g in gaps if g > 3 * median),
        "tail_s": end - steps[-1][0],
        "tokens": sum(r[2] for r in steps),
    }
    front = [r for r in _load(run_dir, "front").get("step", []) if start <= r[0] <= end + 1.0]
    if front:
        lags = sorted(r[0] - r[1] for r in front)
        out.update(front_lag_ms_median=1000 * statistics.median(lags),
                   front_lag_ms_p99=1000 * lags[int(0.99 * (len(lags) - 1))],
                   front_busy_share=sum(r[2] for r in front) / out["wall_s"])
    return out


def compare(directory: str) -> dict:
    meta_path = os.path.join(directory, "meta.json")
    num_prompts = json.load(open(meta_path))["num_prompts"] if os.path.exists(meta_path) else 1
    runs = {}
    for run in ("server", "inproc", "offline"):
        summary = summarize_run(os.path.join(directory, run), num_prompts)
        if summary:
            runs[run] = {k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in summary.items()}
    print(json.dumps({"timeline": runs}, indent=2), flush=True)
    return runs


if __name__ == "__main__":
    compare(sys.argv[1])
