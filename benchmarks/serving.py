"""Online serving benchmark: an async load generator against the OpenAI-compatible server.

A seeded synthetic workload (random token-id prompts of ``--input-len`` +- ``--range-ratio``,
``--output-len`` tokens each, EOS ignored) is sent as streaming /v1/completions requests, all
at once (``--request-rate inf``) or as a Poisson process. Reports request throughput, output
tokens/s, TTFT and TPOT (mean, median, p99). Without ``--base-url`` the server is started
here as a subprocess (with ``--load-format dummy --skip-tokenizer-init`` for a config-only
model directory). ``--compare-offline`` then runs the same workload through ``LLM.generate``
with the same engine flags, after the server has stopped, and prints server/offline tokens/s.
``--compare-inproc`` also serves the workload with ``--disable-frontend-multiprocessing``
(the engine in the server's process) in the same run; ``--rates 4 8 16`` adds a Poisson sweep.
``--repeat N`` runs the main load N times against the one server and the offline workload N
times through the one ``LLM``, and compares the medians (every trial listed): on a 2-core CPU
either side of one run varies by +-15%. ``--timeline DIR`` records per-step timelines of
each run's engine core and front end (``PAGEDLLM_STEP_TIMELINE``) and the main run's client
times under ``DIR/<run>/``, then prints ``benchmarks/timeline.py``'s comparison (where the
server loses time against offline).

The load generator reports its own CPU seconds (all its processes) and warns when one of them
was busy most of the run: then it, not the server, may be the bottleneck, and
``--client-processes N`` splits the requests over N processes (each an asyncio loop).

    python benchmarks/serving.py --model benchmarks/configs/tiny-llama --num-prompts 200 \
        --compare-offline --compare-inproc
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model my-model
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# The load generator and its statistics live in pagedllm.bench.serving (also behind `pagedllm
# bench serve`); this script keeps its flags, its server from tests/utils and its output.
from pagedllm.bench.serving import (  # noqa: E402,F401
    RequestResult, _model_name, make_workload, run_load, run_load_processes, run_offline,
    send_one, summarize)


def _engine_flags(args) -> list[str]:
    flags = list(args.engine_flags)
    if args.dummy:
        flags += ["--load-format", "dummy", "--skip-tokenizer-init"]
    return flags


def _engine_args(args):
    from pagedllm.arg_utils import EngineArgs
    from pagedllm.cli import build_parser
    parsed = build_parser().parse_args(["generate", "--model", args.model,
                                        *_engine_flags(args)])
    parsed.model = args.model
    return EngineArgs.from_cli_args(parsed)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/tiny-llama")
    parser.add_argument("--served-model-name", default=None, help="name in requests "
                        "(default: the first of GET /v1/models)")
    parser.add_argument("--base-url", default=None, help="an already running server; "
                        "default: start one here")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests/s (Poisson arrivals); inf sends all at once")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="token-id range of the prompts (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-offline", action="store_true",
                        help="also run the workload through LLM.generate and print the ratio")
    parser.add_argument("--compare-inproc", action="store_true",
                        help="also serve it with --disable-frontend-multiprocessing")
    parser.add_argument("--rates", type=float, nargs="*", default=[],
                        help="after the main run, a Poisson sweep at these requests/s")
    parser.add_argument("--sweep-prompts", type=int, default=None,
                        help="prompts of each --rates run (default: --num-prompts)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the main load and the offline workload this many times "
                        "each (one server, one LLM) and compare their medians: on a small "
                        "CPU one run of either varies by +-15%%")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load-generator processes (use >1 when one is saturated)")
    parser.add_argument("--timeline", default=None, metavar="DIR",
                        help="write per-step timelines of every run under DIR and compare them")
    parser.add_argument("--no-dummy", dest="dummy", action="store_false",
                        help="load real weights and the tokenizer (default: dummy weights)")
    parser.add_argument("--engine-flags", nargs=argparse.REMAINDER, default=[],
                        help="engine flags for the started server and the offline run "
                        "(everything after this flag)")
    return parser.parse_args(argv)


def _vocab_size(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    with open(os.path.join(args.model, "config.json")) as f:
        return json.load(f)["vocab_size"]


def _timeline_to(args, run: str) -> str | None:
    """Point PAGEDLLM_STEP_TIMELINE (read by processes started from now) at DIR/<run>."""
    if args.timeline is None:
        return None
    path = os.path.join(args.timeline, run)
    os.makedirs(path, exist_ok=True)
    os.environ["PAGEDLLM_STEP_TIMELINE"] = path
    return path


def _save_client(path: str | None, results) -> None:
    if path is not None:
        with open(os.path.join(path, "client.json"), "w") as f:
            json.dump([(r.sent_at, r.done_at, r.output_tokens) for r in results], f)


def _median_trial(args, url: str, model: str, workload) -> tuple[dict, list]:
    """The main load ``--repeat`` times against one server: the summary (and results) of
    the median trial by output tokens/s, with every trial's tokens/s listed."""
    trials = []
    for _ in range(args.repeat):
        results, elapsed, cpu = run_load_processes(url, model, workload, args.request_rate,
                                                   args.seed, args.client_processes)
        trials.append((summarize(results, elapsed, cpu), results))
    trials.sort(key=lambda trial: trial[0]["output_tokens_per_s"])
    summary, results = trials[len(trials) // 2]
    if args.repeat > 1:
        summary["trials_output_tokens_per_s"] = [t[0]["output_tokens_per_s"] for t in trials]
    return summary, results


def serve_and_load(args, workload, extra_flags: list[str], rates=(), run: str = "server"
                   ) -> dict:
    """Start a server (or use --base-url), run the workload (and the --rates sweep): a dict
    of summaries by run name, with the start-up seconds to a healthy /health."""
    server, out = None, {}
    timeline = _timeline_to(args, run)
    if args.base_url is None:
        from tests.utils.server import RemoteServer
        start = time.perf_counter()
        server = RemoteServer(args.model, ["--disable-log-requests", "--uvicorn-log-level",
                                           "warning", *_engine_flags(args), *extra_flags],
                              startup_timeout=600)
        out["startup_s"] = round(time.perf_counter() - start, 2)
    url = args.base_url or server.url
    try:
        model = asyncio.run(_model_name(url, args.served_model_name))
        asyncio.run(run_load(url, model, workload[:2], float("inf"), args.seed))  # warm-up
        out[f"rate_{args.request_rate}"], results = _median_trial(args, url, model, workload)
        _save_client(timeline, results)
        print(json.dumps(out, indent=2), flush=True)
        for rate in rates:
            results, elapsed, cpu = run_load_processes(
                url, model, workload[:args.sweep_prompts], rate, args.seed,
                args.client_processes)
            out[f"rate_{rate}"] = summarize(results, elapsed, cpu)
            print(json.dumps({f"rate_{rate}": out[f"rate_{rate}"]}, indent=2), flush=True)
    finally:
        if server is not None:
            server.stop()
            if "ready in" in server.log_path.read_text():
                for line in server.log_path.read_text().splitlines():
                    if "ready in" in line or "front end:" in line or "core stopped" in line:
                        print("server log:", line, flush=True)
    return out


def main(argv=None) -> None:
    args = _parse_args(argv)
    workload = make_workload(args.num_prompts, args.input_len, args.output_len,
                             args.range_ratio, _vocab_size(args), args.seed)
    main_key = f"rate_{args.request_rate}"
    if args.timeline is not None:
        os.makedirs(args.timeline, exist_ok=True)
        with open(os.path.join(args.timeline, "meta.json"), "w") as f:
            json.dump({"num_prompts": len(workload)}, f)
    runs = {"server": serve_and_load(args, workload, [], args.rates)}
    if args.compare_inproc:
        runs["server_inproc"] = serve_and_load(
            args, workload, ["--disable-frontend-multiprocessing"], run="inproc")
    print(json.dumps(runs, indent=2), flush=True)
    if args.compare_offline:
        from pagedllm import LLM
        _timeline_to(args, "offline")
        llm = LLM.from_engine_args(_engine_args(args))
        trials = sorted(run_offline(llm, workload) for _ in range(args.repeat))
        offline = trials[len(trials) // 2]
        llm.llm_engine.shutdown()  # writes its timeline
        if args.repeat > 1:
            print(json.dumps({"offline_trials_output_tokens_per_s":
                              [round(t, 1) for t in trials]}), flush=True)
        ratios = {f"{name}_over_offline": round(run[main_key]["output_tokens_per_s"] /
                                                offline, 3) for name, run in runs.items()}
        print(json.dumps({"offline_output_tokens_per_s": round(offline, 1), **ratios}),
              flush=True)
    if args.timeline is not None:
        from benchmarks.timeline import compare
        compare(args.timeline)


if __name__ == "__main__":
    main()
