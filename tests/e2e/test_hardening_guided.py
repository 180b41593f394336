"""Issue 24, findings 2 and 3 through the real server (both engine modes): a pathological
guided-decoding constraint or request-supplied chat template answers a 400 naming its field
within the configured budget, while ``/health`` answers and a normal request completes.

Oracles: status 400 with the field named; wall time of the hostile request below the budget
plus start-up slack; ``/health`` latency while the hostile request is pending; the greedy text
of a normal request equals the one measured before any hostile request.
"""
import threading
import time

import httpx
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
BUDGET_S = 3.0
SLACK_S = 12.0  # first use starts the compile / template worker process (imports)
MODES = {"mp": [], "inproc": ["--disable-frontend-multiprocessing"]}

# a regex whose DFA has 2**21 states (issue 24 finding 2), and a schema of the shape
# (strings with maxLength 1000): with the tiny test vocabulary (512 tokens) one such string
# compiles in a second, ten of them take far longer than the budget
_FIELDS = "abcdefghijklmnopqrstuvwxyz"  # each string costs ~1-2 s to compile: far past the budget
HOSTILE_GUIDED = {
    "guided_regex": {"guided_regex": "[ab]*a[ab]{20}"},
    "guided_json": {"guided_json": {"type": "object", "properties": {
        k: {"type": "string", "maxLength": 2000} for k in _FIELDS}, "required": list(_FIELDS)}},
}
# 10**10 loop iterations (the sandbox caps one range at 100000 items, not nesting)
HOSTILE_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                    "{% endfor %}{% endfor %}hi")


@pytest.fixture(scope="module", params=sorted(MODES))
def server(request):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDLLM_GUIDED_COMPILE_TIMEOUT_S", str(BUDGET_S))
        mp.setenv("PAGEDLLM_CHAT_TEMPLATE_TIMEOUT_S", str(BUDGET_S))
        args = ["--served-model-name", MODEL, "--max-model-len", "256",
                "--disable-log-stats", *MODES[request.param]]
        with RemoteServer(str(build_tiny_model("llama")), args) as remote:
            remote.mode = request.param
            yield remote


def _greedy(server, timeout=60) -> tuple[str, float]:
    body = {"model": MODEL, "prompt": "The for statement", "max_tokens": 16,
            "temperature": 0}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"], time.monotonic()


@pytest.fixture(scope="module")
def baseline(server):
    return _greedy(server)[0]


class Hostile(threading.Thread):
    """One hostile request in the background; records its response and when it came."""

    def __init__(self, server, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.base, self.url, self.body = server.url, server.url + path, body
        self.resp, self.start_t, self.end_t = None, None, None

    def run(self) -> None:
        self.start_t = time.monotonic()
        try:
            self.resp = httpx.post(self.url, json=self.body, timeout=BUDGET_S + SLACK_S + 60)
        finally:
            self.end_t = time.monotonic()


def _health_while(hostile: Hostile, seconds: float) -> list[float]:
    """Latencies of /health polled while the hostile request is pending."""
    latencies = []
    deadline = time.monotonic() + seconds
    while hostile.is_alive() and time.monotonic() < deadline:
        start = time.monotonic()
        resp = httpx.get(hostile.base + "/health", timeout=30)
        latencies.append(time.monotonic() - start)
        assert resp.status_code == 200
        time.sleep(0.1)
    return latencies


def _assert_400(hostile: Hostile, field: str) -> None:
    hostile.join(BUDGET_S + SLACK_S + 60)
    assert hostile.resp is not None
    assert hostile.resp.status_code == 400, hostile.resp.text
    assert field in hostile.resp.json()["message"], hostile.resp.text
    assert hostile.end_t - hostile.start_t < BUDGET_S + SLACK_S


@pytest.mark.parametrize("field", sorted(HOSTILE_GUIDED))
def test_hostile_guided_constraint_is_a_400_and_others_keep_generating(server, baseline,
                                                                       field):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, **HOSTILE_GUIDED[field]}
    hostile = Hostile(server, "/v1/completions", body)
    hostile.start()
    time.sleep(0.3)  # the hostile compile has started
    text, done_t = _greedy(server, timeout=BUDGET_S + SLACK_S + 60)
    latencies = _health_while(hostile, BUDGET_S + SLACK_S)
    _assert_400(hostile, field)
    assert text == baseline
    assert max(latencies, default=0.0) < 1.0, latencies
    # the engine kept stepping while the constraint compiled (in both engine modes)
    assert done_t < hostile.end_t
    # a repeat is refused at once (the verdict is cached), and serving goes on
    again = Hostile(server, "/v1/completions", body)
    again.run()
    assert again.resp.status_code == 400 and again.end_t - again.start_t < 1.0
    assert _greedy(server)[0] == baseline


def _chat_body(template: str, path: str = "/tokenize") -> dict:
    body = {"model": MODEL, "chat_template": template,
            "messages": [{"role": "user", "content": "hello"}]}
    return body if path == "/tokenize" else {**body, "max_tokens": 4}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_hostile_chat_template_is_a_400_and_health_answers(server, baseline, path):
    hostile = Hostile(server, path, _chat_body(HOSTILE_TEMPLATE, path))
    hostile.start()
    time.sleep(0.3)
    latencies = _health_while(hostile, BUDGET_S + SLACK_S)
    _assert_400(hostile, "chat_template")
    assert latencies and max(latencies) < 1.0, latencies
    assert _greedy(server)[0] == baseline


def test_request_chat_template_still_renders(server):
    """A benign request template is rendered (as vLLM 0.6.3 allows), in the sandbox."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    resp = httpx.post(server.url + "/tokenize", json=_chat_body(template), timeout=60)
    assert resp.status_code == 200, resp.text
    detok = httpx.post(server.url + "/detokenize",
                       json={"model": MODEL, "tokens": resp.json()["tokens"]}, timeout=60)
    assert "<user>hello" in detok.json()["prompt"].replace(" ", "")


def test_deeply_nested_guided_json_is_a_400_in_both_modes(server):
    """A schema nested 300 objects deep made copying the request's parameters overflow the
    stack: a 500 with the core in its own process (found by the embeddings work), now a 400
    naming the nesting in both modes; the server goes on serving."""
    schema: dict = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}}
    resp = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "x", "max_tokens": 4, "guided_json": schema})
    assert resp.status_code == 400, resp.text
    assert resp.json()["object"] == "error"
    assert _greedy(server)[0]
