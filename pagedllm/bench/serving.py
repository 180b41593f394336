"""Online serving benchmark logic: a seeded synthetic workload sent as streaming
/v1/completions requests (all at once or Poisson arrivals) from one or more load processes;
request throughput, output tokens/s, TTFT and TPOT.

Shared by ``benchmarks/serving.py`` (which keeps its flags and output) and ``pagedllm bench
serve`` (``run_cli``: the server started here with ``pagedllm serve``'s own flags).
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""
    start: float = 0.0  # perf_counter() at send: the chart's time axis
    sent_at: float = 0.0  # wall clock at send and at the last byte (lines up across processes)
    done_at: float = 0.0

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


async def send_one(url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    """One streaming request over its own HTTP/1.1 connection (``Connection: close``).

    The load generator must not be the bottleneck, and it shares the machine with the
    server: it writes the request and reads raw bytes, times the first chunk with a choice
    and parses JSON only for the usage event at the end. (httpx's connection pool was: with
    250 streams per process, every stream that ended scanned the pool, so the last wave of
    completions reached the clients 1.4 s after the engine's last step on the H100.)"""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    result, start = RequestResult(), time.perf_counter()
    result.start, result.sent_at = start, time.time()
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    except OSError as exc:
        result.error = repr(exc)
        return result
    try:
        writer.write(b"POST %s/v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (parts.path.rstrip("/").encode(), parts.netloc.encode(), len(body)) + body)
        status = await reader.readline()
        tail = b""
        while data := await reader.read(65536):
            if result.ttft == 0.0 and b'"choices":[{' in data:
                result.ttft = time.perf_counter() - start
            tail = (tail + data)[-8192:]
        result.latency, result.done_at = time.perf_counter() - start, time.time()
        if b" 200 " not in status:
            result.error = (status + tail)[-300:].decode(errors="replace")
            return result
        events = re.findall(rb"data: (\{.*?\})\r?\n\r?\n", tail)
        usage = json.loads(events[-1]).get("usage") if events else None
        result.output_tokens = usage["completion_tokens"] if usage else 0
        result.ok = usage is not None
        if not result.ok:
            result.error = tail[-200:].decode(errors="replace")
    except (OSError, ValueError) as exc:
        result.error = repr(exc)
    finally:
        writer.close()
    return result


async def run_load(url: str, model: str, workload, request_rate: float,
                   seed: int) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    tasks, start = [], time.perf_counter()
    for prompt, max_tokens in workload:
        tasks.append(asyncio.create_task(send_one(url, model, prompt, max_tokens)))
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
        "duration_s": round(elapsed, 6),  # runs of a few ms: 2-3 significant digits else
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


async def _model_name(url: str, given: str | None) -> str:
    if given:
        return given
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]


# ---- pagedllm bench serve ----------------------------------------------------------------------

def _serve_child(args, log_path: str) -> None:
    """Child process: ``pagedllm serve`` with the parsed flags, its output to ``log_path``
    (the benchmark's own output stays readable)."""
    import os
    import sys
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from pagedllm.cli import _serve
    sys.exit(_serve(args))


class LocalServer:
    """``pagedllm serve`` in a spawned process (its own GIL: the load generator must not share
    the server's), on a free 127.0.0.1 port, with exactly the flags parsed for ``bench
    serve``; stopped with SIGTERM, as a user's Ctrl-C would."""

    def __init__(self, args, startup_timeout: float = 600.0) -> None:
        import copy
        import multiprocessing
        import socket
        import tempfile
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        child_args = copy.copy(args)
        child_args.host, child_args.port = "127.0.0.1", port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tempfile.mktemp(prefix="pagedllm-bench-serve-", suffix=".log")
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve_child, args=(child_args, self.log_path))
        self.proc.start()
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.is_alive():
                raise RuntimeError(f"the server exited ({self.proc.exitcode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _vocab_size(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(args.model).vocab_size


def result_dict(results: list[RequestResult], elapsed: float, client_cpu: list[float],
                extra: dict) -> dict:
    """The bench result: the script's summary plus fuller percentiles and per-request samples
    (TTFT, TPOT, finish time from the first send, output tokens)."""
    from pagedllm.bench.report import distribution_ms
    done = [r for r in results if r.ok]
    t0 = min((r.start for r in results), default=0.0)
    summary = {**extra, **summarize(results, elapsed, client_cpu)}
    summary["ttft_ms"] = distribution_ms([r.ttft for r in done])
    summary["tpot_ms"] = distribution_ms([r.tpot for r in done if r.tpot is not None])
    summary["e2e_latency_ms"] = distribution_ms([r.latency for r in done])
    samples = {"ttft_s": [r.ttft for r in done],
               "tpot_s": [r.tpot for r in done if r.tpot is not None],
               "finish_s": [r.start + r.latency - t0 for r in done],
               "tokens": [r.output_tokens for r in done]}
    return {"benchmark": "serve", "summary": summary, "samples": samples}


def run_cli(args) -> dict:
    """``pagedllm bench serve``: start the server with the flags given (or use --base-url),
    warm it up with two requests, then send the workload."""
    workload = make_workload(args.num_prompts, args.input_len, args.output_len,
                             args.range_ratio, _vocab_size(args), args.seed)
    server = None if args.base_url else LocalServer(args)
    url = args.base_url or server.url
    try:
        names = args.served_model_name
        model = asyncio.run(_model_name(url, names[0] if isinstance(names, list) else names))
        asyncio.run(run_load(url, model, workload[:2], float("inf"), args.seed))  # warm-up
        results, elapsed, cpu = run_load_processes(url, model, workload, args.request_rate,
                                                   args.seed, args.client_processes)
    finally:
        if server is not None:
            server.stop()
    return result_dict(results, elapsed, cpu, {"request_rate": args.request_rate,
                                               "num_prompts": args.num_prompts})
