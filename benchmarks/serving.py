"""Online serving benchmark: an async load generator against the OpenAI-compatible server.

A seeded synthetic workload (random token-id prompts of ``--input-len`` +- ``--range-ratio``,
``--output-len`` tokens each, EOS ignored) is sent as streaming /v1/completions requests, all
at once (``--request-rate inf``) or as a Poisson process. Reports request throughput, output
tokens/s, TTFT and TPOT (mean, median, p99). Without ``--base-url`` the server is started
here as a subprocess (with ``--load-format dummy --skip-tokenizer-init`` for a config-only
model directory). ``--compare-offline`` then runs the same workload through ``LLM.generate``
with the same engine flags, after the server has stopped, and prints server/offline tokens/s.

    python benchmarks/serving.py --model benchmarks/configs/tiny-llama --num-prompts 200 \
        --compare-offline
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


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values) * 1000, "median": statistics.median(values) * 1000,
            "p99": p99 * 1000}


def summarize(results: list[RequestResult], elapsed: float) -> dict:
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


def main(argv=None) -> None:
    args = _parse_args(argv)
    workload = make_workload(args.num_prompts, args.input_len, args.output_len,
                             args.range_ratio, _vocab_size(args), args.seed)
    server = None
    if args.base_url is None:
        from tests.utils.server import RemoteServer
        server = RemoteServer(args.model, ["--disable-log-requests", "--uvicorn-log-level",
                                           "warning", *_engine_flags(args)])
    url = args.base_url or server.url
    try:
        model = asyncio.run(_model_name(url, args.served_model_name))
        asyncio.run(run_load(url, model, workload[:2], float("inf"), args.seed))  # warm-up
        results, elapsed = asyncio.run(run_load(url, model, workload, args.request_rate,
                                                args.seed))
    finally:
        if server is not None:
            server.stop()
    summary = summarize(results, elapsed)
    print(json.dumps({"server": summary}, indent=2), flush=True)
    if args.compare_offline:
        from pagedllm import LLM
        llm = LLM.from_engine_args(_engine_args(args))
        offline = run_offline(llm, workload)
        print(json.dumps({"offline_output_tokens_per_s": round(offline, 1),
                          "server_over_offline": round(summary["output_tokens_per_s"] /
                                                       offline, 3)}), flush=True)


if __name__ == "__main__":
    main()
