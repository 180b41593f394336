"""Issue 24 finding 4 (gap): /v1/completions tokenizes long prompts off the event loop, as chat
completions and /tokenize do, so a megabyte prompt never holds ``/health`` or other requests.

Oracles: ``/health`` latency polled while the big request is pending (< 1 s each, where
tokenizing the prompt on the loop held it for seconds); the big request's own wall time (it
really was long, so the latency bound means something); its status (400 when the text cannot
fit ``max_model_len``, refused before tokenizing; 200 with ``truncate_prompt_tokens``, which
must tokenize all of it); the greedy text of a normal request equals the one before.
"""
import random
import threading
import time

import httpx
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
MAX_MODEL_LEN = 128
WORDS = ("for while class def return lambda yield import list dict tuple string the of a "
         "sequence exception").split()


def _big_text(num_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = []
    total = 0
    while total < num_chars:
        words.append(rng.choice(WORDS))
        total += len(words[-1]) + 1
    return " ".join(words)[:num_chars]


@pytest.fixture(scope="module")
def server():
    args = ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
            "--disable-log-stats", "--disable-log-requests", "--uvicorn-log-level", "warning"]
    with RemoteServer(str(build_tiny_model("llama")), args) as remote:
        yield remote


def _greedy(server) -> str:
    body = {"model": MODEL, "prompt": "The for statement", "max_tokens": 8, "temperature": 0}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


class _Pending(threading.Thread):
    def __init__(self, server, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = server.url + "/v1/completions", body
        self.resp = None
        self.start_t = self.end_t = 0.0

    def run(self) -> None:
        self.start_t = time.monotonic()
        try:
            self.resp = httpx.post(self.url, json=self.body, timeout=120)
        finally:
            self.end_t = time.monotonic()


def _health_latencies_while(server, pending: _Pending) -> list[float]:
    latencies = []
    while pending.is_alive():
        start = time.monotonic()
        resp = httpx.get(server.url + "/health", timeout=30)
        latencies.append(time.monotonic() - start)
        assert resp.status_code == 200
        time.sleep(0.05)
    return latencies


def test_megabyte_prompt_that_cannot_fit_is_refused_without_tokenizing(server):
    before = _greedy(server)
    body = {"model": MODEL, "prompt": _big_text(2_000_000, 0), "max_tokens": 2}
    start = time.monotonic()
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    elapsed = time.monotonic() - start
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert "maximum context length" in message and len(message) < 1000
    assert elapsed < 5.0  # parsing 2 MB of JSON, not tokenizing it
    assert _greedy(server) == before


def test_megabyte_prompts_tokenized_with_truncation_do_not_hold_health(server):
    """``truncate_prompt_tokens`` must tokenize the whole text (~2 s of tokenizer work here for
    three 1.5 MB prompts); meanwhile the event loop answers ``/health`` at once."""
    before = _greedy(server)
    body = {"model": MODEL, "prompt": [_big_text(1_500_000, seed) for seed in range(3)],
            "truncate_prompt_tokens": 16, "max_tokens": 2, "temperature": 0}
    pending = _Pending(server, body)
    pending.start()
    time.sleep(0.3)  # the body is sent and being tokenized
    latencies = _health_latencies_while(server, pending)
    pending.join(120)
    assert pending.resp is not None and pending.resp.status_code == 200, pending.resp.text
    out = pending.resp.json()
    assert len(out["choices"]) == 3
    assert out["usage"]["prompt_tokens"] == 3 * 16
    # the request was long enough that tokenizing it on the loop would have held /health
    assert pending.end_t - pending.start_t > 1.0
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
    assert _greedy(server) == before
