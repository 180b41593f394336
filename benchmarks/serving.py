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
import random
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                  vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lo, hi = max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio))
    return [([rng.randrange(10, vocab_size - 10) for _ in range(rng.randint(lo, hi))],
             output_len) for _ in range(num_prompts)]


async def send_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                   max_tokens: int) -> RequestResult:
    """One streaming request. The client shares the CPU with the server on a small machine,
    so it stays light: it times raw byte chunks and parses JSON only for the usage chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result, start = RequestResult(), time.perf_counter()
    tail = b""
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = (await resp.aread()).decode()[:200]
                return result
            async for data in resp.aiter_raw():
                if result.ttft == 0.0 and b'"choices":[{' in data:
                    result.ttft = time.perf_counter() - start
                tail = (tail + data)[-4096:]
        result.latency = time.perf_counter() - start
        events = [e for e in tail.split(b"\n\n") if e.startswith(b"data: {")]
        usage = json.loads(events[-1][6:]).get("usage") if events else None
        result.output_tokens = usage["completion_tokens"] if usage else 0
        result.ok = usage is not None
        if not result.ok:
            result.error = tail[-200:].decode(errors="replace")
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run_load(url: str, model: str, workload, request_rate: float,
                   seed: int) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        tasks, start = [], time.perf_counter()
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(send_one(client, url, model, prompt, max_tokens)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _load_process(url, model, workload, request_rate, seed, start_at, queue) -> None:
    """One load-generator process: its share of the requests, then (results, CPU s)."""
    time.sleep(max(0.0, start_at - time.time()))  # all processes start together
    cpu = time.process_time()
    results, _ = asyncio.run(run_load(url, model, workload, request_rate, seed))
    queue.put((results, time.process_time() - cpu))


def run_load_processes(url: str, model: str, workload, request_rate: float, seed: int,
                       num_procs: int) -> tuple[list[RequestResult], float, list[float]]:
    """The workload over ``num_procs`` load processes (request i goes to process i % N, each
    at rate/N): (results, wall seconds, CPU seconds of each process)."""
    if num_procs <= 1:
        cpu = time.process_time()
        results, elapsed = asyncio.run(run_load(url, model, workload, request_rate, seed))
        return results, elapsed, [time.process_time() - cpu]
    import multiprocessing
    mp = multiprocessing.get_context("spawn")
    queue, start_at = mp.Queue(), time.time() + 2.0
    procs = [mp.Process(target=_load_process, args=(
        url, model, workload[i::num_procs], request_rate / num_procs, seed + i, start_at,
        queue)) for i in range(num_procs)]
    for proc in procs:
        proc.start()
    parts = [queue.get() for _ in procs]
    elapsed = time.time() - start_at
    for proc in procs:
        proc.join()
    return [r for part, _ in parts for r in part], elapsed, [c for _, c in parts]


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values) * 1000, "median": statistics.median(values) * 1000,
            "p99": p99 * 1000}


def summarize(results: list[RequestResult], elapsed: float,
              client_cpu: list[float] | None = None) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "completed": len(done), "failed": len(results) - len(done),
        "duration_s": round(elapsed, 3),
        "request_throughput": round(len(done) / elapsed, 3),
        "output_tokens_per_s": round(output_tokens / elapsed, 1),
        "ttft_ms": {k: round(v, 2) for k, v in _stats([r.ttft for r in done]).items()},
        "tpot_ms": {k: round(v, 2) for k, v in
                    _stats([r.tpot for r in done if r.tpot is not None]).items()},
    }
    if client_cpu is not None:
        summary["client_cpu_s"] = round(sum(client_cpu), 2)
        summary["client_busiest_process_cpu_fraction"] = round(max(client_cpu) / elapsed, 3)
        if max(client_cpu) > 0.8 * elapsed:
            summary["warning"] = ("a load-generator process was busy >80% of the run: it may be "
                                  "the bottleneck; raise --client-processes")
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def run_offline(llm, workload) -> float:
    """Output tokens/s of the same workload through ``LLM.generate``, all prompts at once."""
    from pagedllm import SamplingParams
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in workload]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


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
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load-generator processes (use >1 when one is saturated)")
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


async def _model_name(url: str, given: str | None) -> str:
    if given:
        return given
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]


def serve_and_load(args, workload, extra_flags: list[str], rates=()) -> dict:
    """Start a server (or use --base-url), run the workload (and the --rates sweep): a dict
    of summaries by run name, with the start-up seconds to a healthy /health."""
    server, out = None, {}
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
        results, elapsed, cpu = run_load_processes(url, model, workload, args.request_rate,
                                                   args.seed, args.client_processes)
        out[f"rate_{args.request_rate}"] = summarize(results, elapsed, cpu)
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
    runs = {"server": serve_and_load(args, workload, [], args.rates)}
    if args.compare_inproc:
        runs["server_inproc"] = serve_and_load(
            args, workload, ["--disable-frontend-multiprocessing"])
    print(json.dumps(runs, indent=2), flush=True)
    if args.compare_offline:
        from pagedllm import LLM
        llm = LLM.from_engine_args(_engine_args(args))
        offline = run_offline(llm, workload)
        ratios = {f"{name}_over_offline": round(run[main_key]["output_tokens_per_s"] /
                                                offline, 3) for name, run in runs.items()}
        print(json.dumps({"offline_output_tokens_per_s": round(offline, 1), **ratios}),
              flush=True)


if __name__ == "__main__":
    main()
