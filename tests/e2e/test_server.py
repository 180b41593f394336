"""The OpenAI-compatible server end to end: a real `python -m ...api_server` subprocess on a
free 127.0.0.1 port with a tiny model, driven by the official `openai` client.

Oracles: ``LLM.generate`` on the same model for greedy text, the non-streamed response for
reassembled streams, /tokenize for usage counts, and the OpenAI error shape for bad input.
"""
import json

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

API_KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 128
MAX_LOGPROBS = 5
PROMPT = "The for statement"


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module", params=["core-process", "in-process"])
def server(model_path, request):
    """Every test runs against both engine clients: the core in its own process (the
    default) and in the server's process (--disable-frontend-multiprocessing)."""
    args = ["--served-model-name", MODEL, "other-name", "--api-key", API_KEY,
            "--max-model-len", str(MAX_MODEL_LEN), "--max-logprobs", str(MAX_LOGPROBS),
            "--disable-log-stats"]
    if request.param == "in-process":
        args.append("--disable-frontend-multiprocessing")
    with RemoteServer(model_path, args) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, max_model_len=MAX_MODEL_LEN)


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_models_version_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "other-name"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_completion_matches_offline_greedy(client, offline):
    expected = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12),
                                use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12)
    assert resp.object == "text_completion" and resp.model == MODEL
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens == resp.usage.total_tokens
    # the same prompt as token ids, and a list of prompts (one choice each, in order)
    ids = offline.get_tokenizer()(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == expected.text
    batch = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], temperature=0,
                                      max_tokens=12)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == expected.text


def test_completion_default_max_tokens_and_echo(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16  # completions default
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                       max_tokens=4, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_completion_stream_reassembles(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_and_stream(client, server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Tell me about lists"}]}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=16)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    prompt_ids = post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    assert full.usage.prompt_tokens == prompt_ids["count"]


def test_chat_default_max_tokens_is_rest_of_context(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
        extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.total_tokens == MAX_MODEL_LEN


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[4:7]
    assert stop.strip(), f"greedy text too short to pick a stop string: {base!r}"
    resp = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16,
                                     stop=[stop], extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.text == base[:base.index(stop)]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    kept = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16,
                                     stop=stop, extra_body={"include_stop_str_in_output": True,
                                                            "ignore_eos": True})
    assert kept.choices[0].text == base[:base.index(stop) + len(stop)]


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.0,
                                         max_tokens=16, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_tokenize_round_trip(server):
    tokens = post(server, "/tokenize", {"model": MODEL, "prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    text = post(server, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == PROMPT


def test_metrics_names_and_counters(server, client):
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting",
             "vllm:num_requests_swapped", "vllm:gpu_cache_usage_perc",
             "vllm:cpu_cache_usage_perc", "vllm:gpu_prefix_cache_hit_rate",
             "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
             "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
             "vllm:time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
             "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
             "vllm:request_params_n_count", "vllm:request_success_total",
             "vllm:cache_config_info"]
    client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4)
    before = server.metrics()
    assert not [n for n in names if n not in before]
    text = httpx.get(f"{server.url}/metrics").text
    assert f'model_name="{MODEL}"' in text
    client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=5,
                              extra_body={"ignore_eos": True})
    after = server.metrics()
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert after["vllm:prompt_tokens_total"] > before["vllm:prompt_tokens_total"]
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"] + 1
    assert after["vllm:e2e_request_latency_seconds_count"] == \
        before["vllm:e2e_request_latency_seconds_count"] + 1


def test_api_key(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for key in (None, "wrong"):
        resp = post(server, "/v1/completions", body, key=key)
        assert resp.status_code == 401
        assert resp.json()["object"] == "error" and resp.json()["code"] == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # not under /v1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong",
                      max_retries=0).models.list()


BAD_REQUESTS = [
    ({"prompt": PROMPT, "temperature": -1.0}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": PROMPT * 100}, 400, "maximum context length"),
    ({"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}, 400, "maximum context length"),
    ({"prompt": PROMPT, "logprobs": MAX_LOGPROBS + 1}, 400, "max-logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10 ** 6]}, 400, "prompt_token_ids"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream"),
    ({"prompt": PROMPT, "model": "no-such-model"}, 404, "does not exist"),
    ({"prompt": PROMPT, "suffix": "x"}, 400, "suffix"),
    ({}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,needle", BAD_REQUESTS)
def test_bad_completion_requests(server, body, status, needle):
    resp = post(server, "/v1/completions", {"model": MODEL, **body})
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert err["object"] == "error" and err["code"] == status and err["param"] is None
    assert err["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    assert needle in err["message"], err["message"]


def test_bad_chat_and_malformed_json(server, client):
    cases = [(None, b'{"model": "tiny", "prompt": ', "JSON"),
             ({"model": MODEL, "messages": []}, None, "messages"),
             ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
               "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, None, "max-logprobs"),
             ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
               "top_logprobs": 2}, None, "logprobs"),
             ({"model": MODEL, "messages": [{"content": "x"}]}, None, "role")]
    for body, raw, needle in cases:
        resp = post(server, "/v1/chat/completions", body, raw=raw)
        assert resp.status_code == 400, resp.text
        assert resp.json()["type"] == "BadRequestError" and needle in resp.json()["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-3, stream=True)
    # ...and the server still answers
    ok = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_n_and_logprobs(client):
    """Work once the sampler supports them; until then a 400 naming the field."""
    try:
        resp = client.completions.create(model=MODEL, prompt=PROMPT, n=2, temperature=1.0,
                                         max_tokens=4, seed=3)
        assert sorted(c.index for c in resp.choices) == [0, 1]
    except openai.BadRequestError as exc:
        assert "n" in str(exc)
    try:
        resp = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, temperature=0,
                                         max_tokens=4)
        lp = resp.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
        assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # keys are texts: may collide
    except openai.BadRequestError as exc:
        assert "logprobs" in str(exc)
    try:
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True,
            top_logprobs=2, temperature=0, max_tokens=4)
        content = resp.choices[0].logprobs.content
        assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    except openai.BadRequestError as exc:
        assert "logprobs" in str(exc)


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_embeddings_on_generative_model(client):
    """vLLM 0.6.3 ``OpenAIServingEmbedding.create_embedding`` on a model that is not an
    embedding model: ``return self.create_error_response("Embedding API disabled")`` (a 400);
    pagedllm's message also says the model does not support the Embeddings API."""
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="Hello")
    message = info.value.body["message"]
    assert "Embedding API disabled" in message
    assert "does not support the Embeddings API" in message
