"""Issue 24, "How it is checked": after rounds of load with mid-stream cancellations the server
returns to idle: every KV block free and no request left (exactly, after each round), and the
resident memory of the API process and of the engine core process (default mode; the one
process with --disable-frontend-multiprocessing) stops growing.

Oracles: ``vllm:gpu_cache_usage_perc`` and the running/waiting/swapped gauges of ``/metrics``
are exactly 0 at idle after every round (as before the first); VmRSS from ``/proc`` measured
at idle after each round: round 1 warms up allocator pools, caches and lazy imports, so the
growth from round 2 to round 5 must stay below ``RSS_GROWTH_LIMIT_KB`` (5 MB) per process.
Measured on CPU with the tiny model over 9 rounds: idle RSS swings by up to ~2.8 MB between
rounds without a trend (core process; in-process server), or creeps by ~0.1 MB a round (API
process in front of the core process); a leak of per-request state (a request's prompt,
outputs, stream queue, detokenizer or KV bookkeeping) of ~20 kB over rounds 2-5 (3 x 96
requests) exceeds the limit.
"""
import asyncio
import random
import time
from pathlib import Path

import openai
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

ROUNDS = 5
REQUESTS_PER_ROUND = 96
CANCEL_EVERY = 4  # a quarter of the streams are cancelled by the client after 3 chunks
CANCELLED_MAX_TOKENS = 128  # only the abort ends them early (prompt + 128 < max_model_len)
RSS_GROWTH_LIMIT_KB = 5 * 1024
WORDS = ("for while class def return lambda yield import list dict tuple string the of a "
         "sequence exception").split()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _core_pid(api_pid: int) -> int:
    """The engine core: the API process's multiprocessing spawn child (the other child is
    multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == api_pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    assert len(found) == 1, f"expected one core process under {api_pid}, found {found}"
    return found[0]


@pytest.fixture(scope="module", params=["core-process", "in-process"])
def server(request):
    # the KV cache (128 blocks of 16 tokens) is smaller than a round's demand, so rounds also
    # preempt and recompute
    args = ["--max-model-len", "256", "--num-gpu-blocks-override", "128",
            "--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "warning"]
    if request.param == "in-process":
        args.append("--disable-frontend-multiprocessing")
    with RemoteServer(str(build_tiny_model("llama")), args) as remote:
        remote.pids = {"api": remote.proc.pid}
        if request.param == "core-process":
            remote.pids["core"] = _core_pid(remote.proc.pid)
        yield remote


async def _stream(client, model: str, prompt: str, max_tokens: int, cancel: bool) -> int:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.8, stream=True,
                                             extra_body={"ignore_eos": True})
    num_chunks = 0
    async for _ in stream:
        num_chunks += 1
        if cancel and num_chunks >= 3:
            await stream.close()  # the client goes away mid-stream
            break
    return num_chunks


async def _round(url: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    jobs = []
    for i in range(REQUESTS_PER_ROUND):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        cancel = i % CANCEL_EVERY == 0
        jobs.append(_stream(client, model, prompt,
                            CANCELLED_MAX_TOKENS if cancel else rng.randint(8, 48), cancel))
    chunks = await asyncio.gather(*jobs)
    await client.close()
    return chunks


def _idle_metrics(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        busy = [metrics[name] for name in ("vllm:num_requests_running",
                                           "vllm:num_requests_waiting",
                                           "vllm:num_requests_swapped",
                                           "vllm:gpu_cache_usage_perc")]
        if not any(busy):
            return metrics
        assert time.monotonic() < deadline, f"not idle after {timeout}s: {busy}"
        time.sleep(0.2)


def test_rss_and_kv_usage_return_to_idle_after_rounds_of_load(server):
    idle = _idle_metrics(server)
    assert idle["vllm:gpu_cache_usage_perc"] == 0.0
    rss = {name: [] for name in server.pids}
    for round_index in range(ROUNDS):
        chunks = asyncio.run(asyncio.wait_for(_round(server.url, round_index), timeout=150))
        # every stream produced output (a lagging front end merges a stream's pending
        # tokens into one chunk, so short requests may come in fewer chunks than tokens)
        assert all(n >= 1 for n in chunks)
        metrics = _idle_metrics(server)  # KV usage and request gauges exactly 0 again
        assert metrics["vllm:gpu_cache_usage_perc"] == 0.0, "KV blocks leaked"
        time.sleep(0.5)  # let the last responses' buffers go
        for name, pid in server.pids.items():
            rss[name].append(_rss_kb(pid))
    print({name: [kb // 1024 for kb in values] for name, values in rss.items()}, "MB")
    for name, values in rss.items():
        growth = values[-1] - values[1]
        assert growth < RSS_GROWTH_LIMIT_KB, (
            f"{name} RSS grew {growth} kB from round 2 to round {ROUNDS}: {values} kB")
    finished = metrics["vllm:request_success_total"] - idle["vllm:request_success_total"]
    completed = ROUNDS * (REQUESTS_PER_ROUND - REQUESTS_PER_ROUND // CANCEL_EVERY)
    # the cancelled streams were aborted, not run to their 128 tokens
    assert completed <= finished < completed + ROUNDS * REQUESTS_PER_ROUND // CANCEL_EVERY // 2
    assert server.proc.poll() is None
