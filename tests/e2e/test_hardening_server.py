"""Issue 24, findings 4, 5, 7 and 8 through the real server (a subprocess with a tiny model):
hostile input gets an OpenAI-shaped 4xx, never a 5xx or FastAPI's ``{"detail": ...}``, and the
server keeps answering (each test ends with a normal completion).

Oracles: the OpenAI error shape, the status, the field the message names, and greedy text of
the same request before and after the hostile ones.
"""
import json

import httpx
import pytest

from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

API_KEY = "hardening-key"
MODEL = "tiny"
MAX_MODEL_LEN = 128
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGEDLLM_MAX_REQUEST_BODY_BYTES", str(BODY_LIMIT))
        args = ["--served-model-name", MODEL, "--api-key", API_KEY,
                "--max-model-len", str(MAX_MODEL_LEN), "--disable-log-stats"]
        with RemoteServer(str(build_tiny_model("llama")), args) as remote:
            yield remote


@pytest.fixture(scope="module")
def baseline(server):
    return _greedy(server)


def _headers(**extra):
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **extra}


def _post(server, path, raw: bytes | str, headers=None):
    if isinstance(raw, str):
        raw = raw.encode()
    return httpx.post(server.url + path, content=raw, headers=headers or _headers(), timeout=60)


def _greedy(server) -> str:
    body = {"model": MODEL, "prompt": "The for statement", "max_tokens": 8, "temperature": 0}
    resp = httpx.post(server.url + "/v1/completions", json=body, headers=_headers(), timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _assert_openai_error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"object", "message", "type", "code"} and "detail" not in body
    assert body["object"] == "error" and body["code"] == status
    assert isinstance(body["message"], str) and body["message"]
    return body


def _assert_still_serving(server, baseline):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert _greedy(server) == baseline


# ---- 5: lone surrogates ---------------------------------------------------------------------
SURROGATE = "a\\ud800b"  # JSON text of a lone UTF-16 surrogate


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "{SURROGATE}", "max_tokens": 2}}'),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok", "{SURROGATE}"]}}'),
    ("/v1/chat/completions", f'{{"model": "{MODEL}", "max_tokens": 2, "messages": '
                             f'[{{"role": "user", "content": "{SURROGATE}"}}]}}'),
    ("/tokenize", f'{{"model": "{MODEL}", "prompt": "{SURROGATE}"}}'),
    ("/tokenize", f'{{"model": "{MODEL}", "messages": '
                  f'[{{"role": "user", "content": "{SURROGATE}"}}]}}'),
])
def test_lone_surrogate_is_400(server, baseline, path, body):
    error = _assert_openai_error(_post(server, path, body), 400)
    assert "surrogate" in error["message"]
    _assert_still_serving(server, baseline)


def test_surrogate_quoted_in_an_error_is_still_400(server, baseline):
    """An error message quoting the surrogate (the unknown model name) must encode."""
    resp = _post(server, "/v1/completions", f'{{"model": "{SURROGATE}", "prompt": "x"}}')
    assert "\\ud800" in _assert_openai_error(resp, 404)["message"]
    _assert_still_serving(server, baseline)


# ---- 7: non-finite numbers ------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", "Infinity"), ("temperature", "NaN"), ("repetition_penalty", "Infinity"),
    ("repetition_penalty", "NaN"), ("top_p", "NaN"), ("presence_penalty", "-Infinity"),
    ("frequency_penalty", "NaN"), ("min_p", "NaN"), ("logit_bias", '{"5": NaN}'),
    ("logit_bias", '{"5": Infinity}'), ("temperature", "1e999"),
])
def test_non_finite_numbers_are_400_naming_the_field(server, baseline, field, value):
    for path, extra in (("/v1/completions", '"prompt": "Hello"'),
                        ("/v1/chat/completions",
                         '"messages": [{"role": "user", "content": "Hello"}]')):
        body = f'{{"model": "{MODEL}", {extra}, "max_tokens": 2, "{field}": {value}}}'
        error = _assert_openai_error(_post(server, path, body), 400)
        assert field in error["message"] and "finite" in error["message"]
    _assert_still_serving(server, baseline)


# ---- 8: error bodies, auth ------------------------------------------------------------------
def test_non_utf8_body_is_openai_400(server, baseline):
    raw = b'{"model": "tiny", "prompt": "\xff\xfe"}'
    error = _assert_openai_error(_post(server, "/v1/completions", raw), 400)
    assert "UTF-8" in error["message"]
    _assert_still_serving(server, baseline)


def test_deeply_nested_json_is_openai_400(server, baseline):
    raw = '{"model": "tiny", "prompt": "x", "deep": ' + "[" * 10_000 + "]" * 10_000 + "}"
    error = _assert_openai_error(_post(server, "/v1/completions", raw), 400)
    assert "nested" in error["message"]
    _assert_still_serving(server, baseline)


def test_unknown_route_and_wrong_method_are_openai_errors(server):
    _assert_openai_error(httpx.get(server.url + "/no/such/route", timeout=10), 404)
    _assert_openai_error(httpx.post(server.url + "/v1/nope", headers=_headers(), timeout=10),
                         404)
    resp = httpx.get(server.url + "/v1/completions", headers=_headers(), timeout=10)
    _assert_openai_error(resp, 405)
    assert "POST" in resp.headers["allow"]


def test_errors_do_not_echo_megabytes(server, baseline):
    huge = "m" * 150_000
    resp = _post(server, "/v1/completions", json.dumps({"model": huge, "prompt": "x"}))
    assert len(_assert_openai_error(resp, 404)["message"]) < 1200
    resp = _post(server, "/v1/completions",
                 json.dumps({"model": MODEL, "prompt": "x", "logit_bias": {huge: 1.0}}))
    assert len(_assert_openai_error(resp, 400)["message"]) < 1200
    _assert_still_serving(server, baseline)


@pytest.mark.parametrize("value", [f"bearer {API_KEY}", f"BEARER {API_KEY}",
                                   f"Bearer {API_KEY}"])
def test_bearer_scheme_is_case_insensitive(server, value):
    resp = httpx.get(server.url + "/v1/models", headers={"Authorization": value}, timeout=10)
    assert resp.status_code == 200, resp.text


def test_first_authorization_header_counts(server):
    good, bad = ("Authorization", f"Bearer {API_KEY}"), ("Authorization", "Bearer wrong")
    ok = httpx.get(server.url + "/v1/models", headers=[good, bad], timeout=10)
    assert ok.status_code == 200, ok.text
    refused = httpx.get(server.url + "/v1/models", headers=[bad, good], timeout=10)
    assert _assert_openai_error(refused, 401)["type"] == "AuthenticationError"
    for value in (f"Basic {API_KEY}", API_KEY, f"Bearer {API_KEY}x", "Bearer",
                  f"Bearer  {API_KEY}"):
        resp = httpx.get(server.url + "/v1/models", headers={"Authorization": value},
                         timeout=10)
        _assert_openai_error(resp, 401)


# ---- 4: size limits -------------------------------------------------------------------------
def test_body_over_the_limit_is_413(server, baseline):
    prompt = "a" * (BODY_LIMIT + 10)
    resp = _post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt}))
    error = _assert_openai_error(resp, 413)
    assert "PAGEDLLM_MAX_REQUEST_BODY_BYTES" in error["message"]
    _assert_still_serving(server, baseline)


def test_chunked_body_over_the_limit_is_413(server, baseline):
    """No Content-Length: the body is counted as it arrives."""
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(BODY_LIMIT // 10_000 + 2):
            yield b"a" * 10_000
        yield b'"}'

    resp = httpx.post(server.url + "/v1/completions", content=chunks(), headers=_headers(),
                      timeout=60)
    _assert_openai_error(resp, 413)
    _assert_still_serving(server, baseline)


def test_text_that_cannot_fit_is_400_before_tokenizing(server, baseline):
    """Under the body cap but longer than max_model_len x the longest vocabulary entry."""
    prompt = "a " * 60_000
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": prompt}),
                       ("/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}),
                       ("/tokenize", {"model": MODEL, "prompt": prompt})):
        error = _assert_openai_error(_post(server, path, json.dumps(body)), 400)
        assert "cannot fit" in error["message"]
    _assert_still_serving(server, baseline)
