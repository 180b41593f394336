"""Issue 24, "How it is checked": a bounded schemathesis run over the real server's
``/openapi.json`` (the completion, chat, tokenize, detokenize and models routes): no response
is a 5xx, and the server is healthy afterwards.

Schemathesis (its CLI, in a subprocess) generates positive and negative request bodies from the
schema for ~100 s with a fixed seed (two workers, so the exact set of cases can vary with
timing). Two hooks (written next to the test, loaded through ``SCHEMATHESIS_HOOKS``):
``before_call`` points a string ``model`` at the served model (else nearly every case stops at
the 404 for an unknown model), gives every other case whose ``messages`` are not a list of
messages with a role one valid message (the schema leaves messages loose, so chat requests
otherwise never get past validation), and caps valid-looking large ``max_tokens`` / ``min_tokens`` /
``max_completion_tokens`` at 16 and ``n`` / ``best_of`` at 4 (values that are not integers, or
are negative, go through untouched), so generation stays fast on CPU; ``after_call`` logs every
response's status, the oracle here (besides schemathesis's own ``not_a_server_error`` check).

The first run found a 5xx: beam search (``use_beam_search``) with a prompt the engine refuses
(token ids outside the vocabulary, or an empty prompt) was a 500; it is a 400 now
(``test_beam_search_refused_prompt_is_a_400``).
"""
import collections
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.utils.server import REPO_ROOT, RemoteServer
from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

MODEL = "tiny"
SEED = 20240624
MAX_TIME_S = 100
OPERATIONS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
              "/v1/models"]

HOOKS = textwrap.dedent('''
    import os
    import threading

    import schemathesis

    _LOCK = threading.Lock()
    _CAPS = {"max_tokens": 16, "min_tokens": 16, "max_completion_tokens": 16, "n": 4,
             "best_of": 4}


    @schemathesis.hook
    def before_call(ctx, case, **kwargs):
        body = case.body
        if isinstance(body, dict):
            if isinstance(body.get("model"), str):
                body["model"] = os.environ["FUZZ_MODEL"]
            messages = body.get("messages")
            if isinstance(messages, list) and len(repr(body)) % 2 == 0 and not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                # the schema leaves messages loose: half of these get a valid one, so the
                # fuzzed fields around it reach rendering and generation
                body["messages"] = [{"role": "user", "content": "hello"}]
            for key, cap in _CAPS.items():
                value = body.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                    body[key] = cap


    @schemathesis.hook
    def after_call(ctx, case, response):
        with _LOCK, open(os.environ["FUZZ_LOG"], "a") as log:
            log.write(f"{response.status_code} {case.method} {case.path}\\n")
''')


@pytest.fixture(scope="module")
def server():
    # a small context and KV cache (64 blocks of 16 tokens): the fuzzer's requests are short
    args = ["--served-model-name", MODEL, "--max-model-len", "128",
            "--num-gpu-blocks-override", "64", "--disable-log-requests", "--disable-log-stats",
            "--uvicorn-log-level", "warning"]
    with RemoteServer(str(build_tiny_model("llama")), args) as remote:
        yield remote


def test_schemathesis_finds_no_server_error(server, tmp_path):
    (tmp_path / "fuzz_hooks.py").write_text(HOOKS)
    log_path = tmp_path / "responses.log"
    env = dict(os.environ, SCHEMATHESIS_HOOKS="fuzz_hooks", FUZZ_MODEL=MODEL,
               FUZZ_LOG=str(log_path),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    includes = [arg for path in OPERATIONS for arg in ("--include-path", path)]
    cmd = [sys.executable, "-c",
           "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
           "run", f"{server.url}/openapi.json", *includes, "--checks", "not_a_server_error",
           "--seed", str(SEED), "--max-examples", "200", "--max-time", str(MAX_TIME_S),
           "--workers", "2", "--request-timeout", "60", "--no-shrink", "--warnings", "off"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=MAX_TIME_S + 120)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    counts = collections.Counter(lines)
    server_errors = {line: n for line, n in counts.items() if int(line.split()[0]) >= 500}
    print(f"{len(lines)} responses:", dict(counts.most_common()))
    assert not server_errors, f"{server_errors}\n{output}\n{server.log()}"
    assert proc.returncode == 0, output
    # the run was real: many responses, every operation reached, and generation exercised
    assert len(lines) >= 500, output
    for path in OPERATIONS:
        assert any(line.endswith(f" {path}") for line in lines), (path, output)
    assert counts["200 POST /v1/completions"] > 0 and counts["200 POST /tokenize"] > 0
    assert counts["200 POST /v1/chat/completions"] > 0
    # the server is healthy and still generates
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    resp = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The for statement", "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("prompt", [[VOCAB_SIZE + 88, 700], [5, -1], ""])
def test_beam_search_refused_prompt_is_a_400(server, prompt):
    """Found by the fuzzer: beam search handed the prompt to the engine without mapping its
    refusal (out-of-vocabulary ids, an empty prompt) to a 400, so it was a 500."""
    body = {"model": MODEL, "prompt": prompt, "use_beam_search": True, "n": 2,
            "max_tokens": 4, "add_special_tokens": False}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()
    assert error["object"] == "error" and error["code"] == 400
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    ok = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        **body, "prompt": [5, 6]})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
