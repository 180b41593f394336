"""The server under load: 200 concurrent streaming requests, a quarter cancelled by the client
mid-stream. Oracle: every other request streams exactly the greedy text it gets when sent
alone; afterwards no request is left in the engine and every KV block is free again."""
import asyncio
import random
import time

import openai
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

NUM_REQUESTS = 200
CANCEL_EVERY = 4  # a quarter of the requests
CANCELLED_MAX_TOKENS = 180  # long enough that only an abort ends them early
WORDS = ("for while class def return lambda yield import list dict tuple string the of a "
         "sequence exception").split()


def _workload(seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(8)]
    return [(prompts[i % len(prompts)], 16 + 8 * (i % 3)) for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module", params=["core-process", "in-process"])
def server(request):
    # Both engine clients: the core in its own process, and in the server's process.
    # A small KV cache (256 blocks of 16 tokens) so 200 requests also exercise preemption.
    # fp32 everywhere: on CUDA `--dtype auto` runs this fp32 checkpoint in fp16, whose
    # batch-size-dependent rounding flips near-tied greedy choices (exact equality is the oracle)
    args = ["--dtype", "float32", "--max-model-len", "256", "--num-gpu-blocks-override", "256",
            "--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "warning"]
    if request.param == "in-process":
        args.append("--disable-frontend-multiprocessing")
    with RemoteServer(str(build_tiny_model("llama")), args) as remote:
        yield remote


async def _stream(client, model: str, prompt: str, max_tokens: int,
                  cancel_after: int | None) -> str | None:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    text, num_chunks = [], 0
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        num_chunks += 1
        if cancel_after is not None and num_chunks >= cancel_after:
            await stream.close()  # the client goes away mid-stream
            return None
    return "".join(text)


async def _run(server, workload) -> tuple[dict, list]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                                timeout=120)
    model = (await client.models.list()).data[0].id
    alone = {}
    for key in sorted(set(workload)):
        alone[key] = await _stream(client, model, *key, cancel_after=None)
    results = await asyncio.gather(*(
        _stream(client, model, prompt, CANCELLED_MAX_TOKENS, 3) if i % CANCEL_EVERY == 0 else
        _stream(client, model, prompt, max_tokens, None)
        for i, (prompt, max_tokens) in enumerate(workload)))
    await client.close()
    return alone, results


def _wait_idle(server, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        busy = (metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"] +
                metrics["vllm:num_requests_swapped"] + metrics["vllm:gpu_cache_usage_perc"])
        if busy == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def test_concurrent_streams_with_cancellation(server):
    workload = _workload()
    start = time.monotonic()
    before = server.metrics()
    alone, results = asyncio.run(asyncio.wait_for(_run(server, workload), timeout=150))
    elapsed = time.monotonic() - start
    for i, ((prompt, max_tokens), text) in enumerate(zip(workload, results)):
        if i % CANCEL_EVERY == 0:
            assert text is None
        else:
            assert text == alone[(prompt, max_tokens)], f"request {i} differs"
    metrics = _wait_idle(server)
    assert metrics["vllm:num_requests_running"] == 0 and metrics["vllm:num_requests_waiting"] == 0
    assert metrics["vllm:num_requests_swapped"] == 0
    assert metrics["vllm:gpu_cache_usage_perc"] == 0.0, "KV blocks leaked"
    num_finished = metrics["vllm:request_success_total"] - before.get(
        "vllm:request_success_total", 0.0)
    num_completed = NUM_REQUESTS - NUM_REQUESTS // CANCEL_EVERY + len(alone)
    # cancelled requests were aborted, not run to the end
    assert num_completed <= num_finished < num_completed + NUM_REQUESTS // CANCEL_EVERY // 2
    assert elapsed < 150
    # and the server still answers
    assert server.metrics()["vllm:num_requests_running"] == 0


def test_non_streaming_disconnect_aborts(server):
    """A client that gives up on a non-streaming request aborts it: it never finishes."""
    import httpx
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    before = server.metrics()
    for path, body in [("/v1/completions", {"prompt": "The for statement"}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]})]:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}{path}", timeout=0.05, json={
                "model": model, "max_tokens": 200, "ignore_eos": True, "temperature": 0,
                **body})
    metrics = _wait_idle(server)
    assert metrics["vllm:gpu_cache_usage_perc"] == 0.0
    assert metrics["vllm:request_success_total"] == before["vllm:request_success_total"]
