"""Guided decoding through the OpenAI server with the official client (``extra_body``), plain
and streamed; invalid constraints are HTTP 400 carrying the parser's message."""
import json
import re

import jsonschema
import openai
import pytest

pytest.importorskip("xgrammar")

from tests.guided.cases import ARITH_EBNF, MAX_TOKENS, SCHEMAS, parse_arith
from tests.utils.server import RemoteServer

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(model_path):
    args = ["--served-model-name", MODEL, "--max-model-len", "256", "--disable-log-stats",
            "--guided-decoding-backend", "xgrammar", "--block-size", "8"]
    with RemoteServer(model_path, args) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _complete(client, extra, n=3, stream=False, **kw):
    kw = dict(model=MODEL, prompt="Give me data:", max_tokens=MAX_TOKENS, temperature=1.0,
              n=n, extra_body=extra, **kw)
    if not stream:
        choices = client.completions.create(**kw).choices
        assert all(c.finish_reason == "stop" for c in choices)
        return [c.text for c in choices]
    texts = [""] * n
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    return texts


@pytest.mark.parametrize("stream", [False, True])
def test_guided_json_regex_choice_grammar(client, stream):
    schema = SCHEMAS["nested"]
    for text in _complete(client, {"guided_json": schema}, stream=stream):
        jsonschema.validate(json.loads(text), schema)
    for text in _complete(client, {"guided_regex": r"\d{3}-[a-z]{2}"}, stream=stream):
        assert re.fullmatch(r"\d{3}-[a-z]{2}", text)
    for text in _complete(client, {"guided_choice": ["alpha", "beta"]}, stream=stream):
        assert text in ("alpha", "beta")
    for text in _complete(client, {"guided_grammar": ARITH_EBNF}, stream=stream):
        assert parse_arith(text), text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_format_json_schema(client, stream):
    schema = SCHEMAS["array_enum"]
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "colors?"}], temperature=1.0,
              max_tokens=MAX_TOKENS,
              response_format={"type": "json_schema",
                               "json_schema": {"name": "colors", "schema": schema}})
    if stream:
        text = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(stream=True, **kw)
                       if chunk.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_chat_json_object_and_guided_choice(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        extra_body={"guided_choice": ["on", "off"], "guided_decoding_backend": "xgrammar"})
    assert out.choices[0].message.content in ("on", "off")
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        response_format={"type": "text"})
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra, message", [
    ({"guided_json": {"type": "nonsense"}}, "nonsense"),
    ({"guided_json": "{not json"}, "JSON"),
    ({"guided_regex": "(unclosed"}, "parenthesis"),
    ({"guided_grammar": "root ::= missing_rule"}, "missing_rule"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "one kind of guided decoding"),
    ({"guided_grammar": ARITH_EBNF, "guided_decoding_backend": "lm-format-enforcer"},
     "not supported by the lm-format-enforcer backend.*xgrammar"),
])
def test_invalid_constraint_is_400(client, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=extra)


@pytest.mark.parametrize("stream", [False, True])
def test_outlines_backend_per_request(client, stream):
    pytest.importorskip("outlines_core")
    extra = {"guided_regex": r"[0-9]{3}-[a-z]{2}", "guided_decoding_backend": "outlines"}
    for text in _complete(client, extra, stream=stream):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)


@pytest.mark.parametrize("stream", [False, True])
def test_lmfe_backend_per_request(client, stream):
    pytest.importorskip("lmformatenforcer")
    schema = SCHEMAS["array_enum"]
    extra = {"guided_json": schema, "guided_decoding_backend": "lm-format-enforcer"}
    for text in _complete(client, extra, stream=stream):
        jsonschema.validate(json.loads(text), schema)
