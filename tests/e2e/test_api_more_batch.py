"""The batch runner (issue 20 item 10): ``python -m pagedllm.entrypoints.openai.run_batch`` and
``pagedllm run-batch`` over an OpenAI batch file, on a tiny random llama.

Expected values: the texts and logprobs of offline ``LLM.generate`` / ``LLM.chat`` on the same
model (greedy), and vLLM 0.6.3's ``run_batch.py`` output shape, quoted in each docstring.
"""
import json
import subprocess
import sys

import pytest

from pagedllm import LLM, SamplingParams
from tests.utils.server import REPO_ROOT
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
MAX_MODEL_LEN = 128
PROMPTS = ["The for statement", "A list is a sequence of"]
MESSAGES = [{"role": "user", "content": "What is a list?"}]
FLAGS = ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
         "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, max_model_len=MAX_MODEL_LEN, dtype="float32")


def _line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _batch_lines():
    completion = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                  "logprobs": 2}
    return [
        _line("cmpl", "/v1/completions", completion),
        _line("cmpl-2", "/v1/completions", {**completion, "prompt": PROMPTS[1]}),
        "",  # empty lines are skipped, as vLLM does
        _line("chat", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                               "max_tokens": 8, "temperature": 0}),
        _line("embed", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
        _line("stream", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                                 "stream": True}),
        _line("typo", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokenz": 3}),
        _line("unknown-model", "/v1/completions", {"model": "nope", "prompt": "x"}),
        _line("other-url", "/v1/moderations", {"model": MODEL, "input": "x"}),
    ]


def _run(args, tmp_path, lines):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([*args, "-i", str(inp), "-o", str(out), *FLAGS],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    return proc, out


@pytest.fixture(scope="module")
def results(model_path, tmp_path_factory):
    """custom_id -> output line, from ``python -m pagedllm.entrypoints.openai.run_batch``."""
    proc, out = _run([sys.executable, "-m", "pagedllm.entrypoints.openai.run_batch",
                      "--model", model_path], tmp_path_factory.mktemp("batch"), _batch_lines())
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert not text.endswith("\n")  # vLLM writes ``output_buffer.read().strip()``
    outputs = [json.loads(line) for line in text.split("\n")]
    assert [o["custom_id"] for o in outputs] == [
        "cmpl", "cmpl-2", "chat", "embed", "stream", "typo", "unknown-model", "other-url"]
    return {o["custom_id"]: o for o in outputs}


def test_completions_equal_offline_generate(results, offline):
    """vLLM 0.6.3 run_batch.py ``run_request``: a response becomes ``BatchRequestOutput(id=
    f"vllm-{random_uuid()}", custom_id=..., response=BatchResponseData(body=response,
    request_id=f"vllm-batch-{random_uuid()}"), error=None)`` (status_code defaults to 200).
    The body is the /v1/completions response; text and logprobs equal LLM.generate's."""
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    for custom_id, want in zip(("cmpl", "cmpl-2"), expected):
        out = results[custom_id]
        assert out["id"].startswith("vllm-") and out["error"] is None
        response = out["response"]
        assert response["status_code"] == 200
        assert response["request_id"].startswith("vllm-batch-")
        body = response["body"]
        assert body["object"] == "text_completion" and body["model"] == MODEL
        choice = body["choices"][0]
        assert choice["text"] == want.outputs[0].text
        got_lps = choice["logprobs"]["token_logprobs"]
        want_lps = [step[t].logprob for t, step in zip(want.outputs[0].token_ids,
                                                       want.outputs[0].logprobs)]
        assert got_lps == pytest.approx(want_lps, abs=1e-5)
        assert body["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)


def test_chat_equals_offline_chat(results, offline):
    """vLLM 0.6.3 run_batch.py: ``if request.url == "/v1/chat/completions":`` the line runs
    through ``openai_serving_chat.create_chat_completion`` (response_role "assistant"); the
    message equals LLM.chat's greedy text."""
    want = offline.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=0),
                        use_tqdm=False)[0]
    body = results["chat"]["response"]["body"]
    assert results["chat"]["response"]["status_code"] == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": want.outputs[0].text,
                                             "tool_calls": []}


def test_errors_are_per_line(results):
    """vLLM 0.6.3 run_batch.py: a stream body answers ``error_msg="Request must not be sent in
    stream mode"`` with ``status_code=HTTPStatus.BAD_REQUEST``; an ``ErrorResponse`` becomes
    ``BatchResponseData(status_code=response.code, ...)`` with ``error=response``; an unknown
    url is an error line, not the end of the run. Embeddings on a generative model: the
    route's ``ErrorResponse`` (0.6.3: ``create_embedding`` answers "Embedding API disabled")."""
    stream = results["stream"]
    assert stream["response"]["status_code"] == 400 and stream["response"]["body"] is None
    assert stream["error"] == "Request must not be sent in stream mode"
    unknown = results["unknown-model"]
    assert unknown["response"]["status_code"] == 404
    assert unknown["error"]["code"] == 404 and "nope" in unknown["error"]["message"]
    typo = results["typo"]
    assert typo["response"]["status_code"] == 400
    assert "max_tokenz" in typo["error"]["message"]
    assert typo["error"]["type"] == "BadRequestError"
    embed = results["embed"]
    assert embed["response"]["status_code"] == 400
    assert embed["error"]["code"] == 400
    assert "Embedding API disabled" in embed["error"]["message"]
    assert "does not support the Embeddings API" in embed["error"]["message"]
    assert "/v1/moderations" in results["other-url"]["error"]


def test_pagedllm_run_batch_subcommand(model_path, tmp_path, offline):
    """``pagedllm run-batch`` is the same runner as ``python -m ...run_batch`` (vLLM 0.6.3 has
    only the module form; ``vllm run-batch`` came later)."""
    proc, out = _run([sys.executable, "-m", "pagedllm", "run-batch", model_path], tmp_path,
                     [_batch_lines()[0]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = [json.loads(line) for line in out.read_text().splitlines()]
    want = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0),
                            use_tqdm=False)[0]
    assert result["response"]["body"]["choices"][0]["text"] == want.outputs[0].text


def test_malformed_line_stops_before_loading(model_path, tmp_path):
    """A line that is not a batch request stops the run naming it (vLLM 0.6.3's
    ``BatchRequestInput.model_validate_json(request_json)`` raises before any request runs);
    no output file is written."""
    proc, out = _run([sys.executable, "-m", "pagedllm", "run-batch", model_path], tmp_path,
                     [_batch_lines()[0], '{"custom_id": "x", "url": "/v1/completions"}'])
    assert proc.returncode == 2
    assert "input line 2 lacks method, body" in proc.stderr
    assert not out.exists()
