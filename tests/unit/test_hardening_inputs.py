"""Issue 24, findings 4, 5, 7 and 8 below the HTTP layer: sampling numbers must be finite,
tokenizer failures on user text are the user's 400, text that cannot fit is refused before it
is tokenized, and error messages stay short and encodable."""
import json
import math

import pytest

from pagedllm.entrypoints.openai import api_server
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.entrypoints.openai.serving_engine import (OpenAIError, OpenAIServing,
                                                        ServingContext, build_params)
from pagedllm.sampling_params import SamplingParams

NON_FINITE = [math.nan, math.inf, -math.inf]
FLOAT_FIELDS = ["temperature", "repetition_penalty", "presence_penalty", "frequency_penalty",
                "top_p", "min_p"]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", NON_FINITE)
def test_sampling_params_reject_non_finite_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be a finite number"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("value", NON_FINITE)
def test_sampling_params_reject_non_finite_logit_bias(value):
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias values must be finite"):
        SamplingParams(logit_bias={3: 1.0, 5: value})


def test_finite_values_still_accepted():
    params = SamplingParams(temperature=1e30, repetition_penalty=2, logit_bias={3: -100.0})
    assert params.temperature == 1e30 and params.logit_bias == {3: -100.0}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("name", FLOAT_FIELDS + ["length_penalty"])
def test_requests_reject_non_finite_json_numbers(name, literal):
    """JSON as FastAPI reads it (Python's json takes NaN/Infinity literals)."""
    for cls, extra in ((CompletionRequest, '"prompt": "x"'),
                       (ChatCompletionRequest, '"messages": [{"role": "user", "content": "x"}]')):
        body = json.loads(f'{{"model": "m", {extra}, "{name}": {literal}}}')
        with pytest.raises(ValueError, match=rf"{name}\n.*finite number"):
            cls(**body)


def test_request_rejects_non_finite_logit_bias():
    body = json.loads('{"model": "m", "prompt": "x", "logit_bias": {"7": NaN}}')
    with pytest.raises(ValueError, match=r"logit_bias\.7\n.*finite number"):
        CompletionRequest(**body)


class _Tokenizer:
    """Counts calls; raises ``error`` when set; every vocabulary entry is 4 characters."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls, self.error = 0, error

    def get_vocab(self) -> dict:
        return {"abcd": 0, "a": 1, "b": 2}

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"input_ids": [1] * len(text)}


def _serving(tokenizer, max_model_len=10) -> OpenAIServing:
    ctx = ServingContext(engine=None, tokenizer=tokenizer, served_model_names=["m"],
                         max_model_len=max_model_len, max_logprobs=5)
    return OpenAIServing(ctx)


class _PanicException(BaseException):
    """Like pyo3's PanicException (a Rust panic inside a tokenizer): not an Exception."""


@pytest.mark.parametrize("error", [TypeError("TextEncodeInput must be Union"),
                                   _PanicException("tokenizer panicked"),
                                   RuntimeError("whatever")])
def test_tokenizer_errors_on_user_text_are_400(error):
    with pytest.raises(OpenAIError) as info:
        _serving(_Tokenizer(error)).tokenize("hello", True)
    assert info.value.status == 400 and info.value.err_type == "BadRequestError"
    assert "could not be tokenized" in info.value.message


def test_lone_surrogate_is_400_before_the_tokenizer():
    tokenizer = _Tokenizer()
    with pytest.raises(OpenAIError, match=r"lone UTF-16 surrogate .* position 1") as info:
        _serving(tokenizer).tokenize("a\ud800b", True)
    assert info.value.status == 400 and tokenizer.calls == 0


def test_text_that_cannot_fit_is_refused_without_tokenizing():
    """max_model_len 10 x 4 characters per token at most = 40 characters."""
    tokenizer = _Tokenizer()
    serving = _serving(tokenizer)
    assert serving.tokenize("a" * 40, True) == [1] * 40  # may fit: tokenized (then checked)
    with pytest.raises(OpenAIError, match="41 characters cannot fit") as info:
        serving.tokenize("a" * 41, True)
    assert info.value.status == 400 and tokenizer.calls == 1
    # truncation keeps the tail of text of any length
    assert serving.tokenize("a" * 41, True, truncate=3) == [1, 1, 1]


def test_build_params_turns_non_finite_into_400():
    request = CompletionRequest(model="m", prompt="x")
    request.temperature = math.inf  # past pydantic: SamplingParams still refuses it
    with pytest.raises(OpenAIError, match="temperature must be a finite number"):
        build_params(request, 16)


def test_error_messages_are_capped_and_encodable():
    response = api_server._error("x" * 5_000_000 + "\ud800", "BadRequestError",
                                 api_server.HTTPStatus.BAD_REQUEST)
    body = json.loads(response.body)
    assert body["object"] == "error" and body["code"] == 400
    assert len(body["message"]) < api_server.MAX_ERROR_MESSAGE_CHARS + 100
    assert body["message"].endswith("(4999001 more characters)")
    short = json.loads(api_server._error("bad \ud800", "BadRequestError",
                                         api_server.HTTPStatus.BAD_REQUEST).body)
    assert short["message"] == "bad \\ud800"


def test_body_limit_env(monkeypatch):
    monkeypatch.delenv(api_server.MAX_BODY_ENV, raising=False)
    assert api_server.max_request_body_bytes() == api_server.DEFAULT_MAX_REQUEST_BODY_BYTES
    monkeypatch.setenv(api_server.MAX_BODY_ENV, "1234")
    assert api_server.max_request_body_bytes() == 1234
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(api_server.MAX_BODY_ENV, bad)
        with pytest.raises(ValueError, match=api_server.MAX_BODY_ENV):
            api_server.max_request_body_bytes()
