"""vLLM 0.6.3 parity of the OpenAI server (issue 20: prompt scoring, prompt_logprobs, tool-call
histories, unknown fields, echo logprob order, metrics semantics, VLLM_API_KEY).

One real server (tests/utils/server.py) with a tiny random llama; the expected values are vLLM
0.6.3's behaviour (the source line matched is quoted in each docstring) and, for logprobs,
offline ``LLM.generate`` on the same model.
"""
import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
MAX_MODEL_LEN = 128
PROMPT = "The for statement"
TOL = 1e-5  # the server batches differently from the offline run (float32 on CPU)


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def server(model_path):
    args = ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
            "--max-logprobs", "5"]
    with RemoteServer(model_path, args) as remote:
        yield remote


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, max_model_len=MAX_MODEL_LEN)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60)


def offline_prompt_logprobs(offline, prompt_ids, num):
    params = SamplingParams(max_tokens=1, prompt_logprobs=num, temperature=0)
    out = offline.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0]
    return out.prompt_logprobs


def prompt_ids(server, **body):
    return post(server, "/tokenize", {"model": MODEL, **body}).json()["tokens"]


def test_echo_with_max_tokens_zero_scores_the_prompt(server, client, offline):
    """vLLM 0.6.3 serving_completion.py: ``if request.echo and request.max_tokens == 0:`` the
    choice is ``token_ids = prompt_token_ids; out_logprobs = prompt_logprobs; output_text =
    prompt_text`` (protocol.py runs the engine with ``max_tokens=max_tokens if not
    echo_without_generation else 1`` and usage counts ``len(output.token_ids)``)."""
    ids = prompt_ids(server, prompt=PROMPT)
    expected = offline_prompt_logprobs(offline, ids, 1)
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            lp = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
            tokens = [t for part in lp for t in part.tokens]
            token_logprobs = [v for part in lp for v in part.token_logprobs]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            resp = client.completions.create(**kw)
            choice = resp.choices[0]
            text, finish = choice.text, choice.finish_reason
            tokens, token_logprobs = choice.logprobs.tokens, choice.logprobs.token_logprobs
            assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 1
        assert text == PROMPT and finish == "length"
        assert len(tokens) == len(ids) and token_logprobs[0] is None
        assert token_logprobs[1:] == pytest.approx(
            [step[tid].logprob for step, tid in zip(expected[1:], ids[1:])], abs=TOL)


def test_prompt_scoring_of_several_prompts_without_logprobs(client):
    """Same branch of serving_completion.py with ``request.logprobs is None``: the text is
    the prompt alone and ``logprobs`` is None, one choice per prompt."""
    resp = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello"], echo=True,
                                     max_tokens=0)
    assert [c.text for c in resp.choices] == [PROMPT, "Hello"]
    assert all(c.logprobs is None for c in resp.choices)


def _check_prompt_logprobs(got, expected, ids, num):
    """vLLM's shape: None for the first position, then ``{token_id: {logprob, rank,
    decoded_token}}`` with the prompt token first and at most ``num`` others."""
    assert len(got) == len(ids) and got[0] is None
    for step, want, tid in zip(got[1:], expected[1:], ids[1:]):
        assert next(iter(step)) == str(tid)
        assert set(step) == {str(t) for t in want} and len(step) <= num + 1
        for key, entry in step.items():
            assert set(entry) == {"logprob", "rank", "decoded_token"}
            assert entry["logprob"] == pytest.approx(want[int(key)].logprob, abs=TOL)
            assert entry["rank"] == want[int(key)].rank


@pytest.mark.parametrize("num", [0, 2])
def test_completion_prompt_logprobs(server, offline, num):
    """vLLM 0.6.3 serving_completion.py: ``prompt_logprobs=final_res.prompt_logprobs`` (no
    truthiness test on the request: prompt_logprobs=0 returns the prompt tokens' own)."""
    ids = prompt_ids(server, prompt=PROMPT)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "prompt_logprobs": num}
    got = post(server, "/v1/completions", body).json()["choices"][0]["prompt_logprobs"]
    _check_prompt_logprobs(got, offline_prompt_logprobs(offline, ids, num), ids, num)


def test_chat_prompt_logprobs(server, offline):
    """vLLM 0.6.3 serving_chat.py: ``ChatCompletionResponse(..., prompt_logprobs=
    final_res.prompt_logprobs)``; protocol.py: ``if prompt_logprobs is None and self.echo:
    prompt_logprobs = self.top_logprobs``."""
    messages = [{"role": "user", "content": "Hello there"}]
    ids = prompt_ids(server, messages=messages)
    # temperature 1 (chat's default is 0.7): logprobs are of the temperature-scaled logits
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "prompt_logprobs": 2,
            "temperature": 1.0}
    got = post(server, "/v1/chat/completions", body).json()["prompt_logprobs"]
    _check_prompt_logprobs(got, offline_prompt_logprobs(offline, ids, 2), ids, 2)
    echo = post(server, "/v1/chat/completions", {**body, "prompt_logprobs": None,
                                                 "echo": True}).json()
    _check_prompt_logprobs(echo["prompt_logprobs"], offline_prompt_logprobs(offline, ids, 0),
                           ids, 0)
    plain = post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                  "max_tokens": 2}).json()
    assert plain["prompt_logprobs"] is None


def test_echo_top_logprobs_put_the_chosen_token_first(client, offline, server):
    """vLLM 0.6.3 serving_completion.py ``_create_completion_logprobs``: ``for i, top_lp in
    enumerate(step_top_logprobs.items()) if num_output_top_logprobs >= i`` over the engine's
    dict, which holds the chosen (prompt or sampled) token first."""
    resp = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=3,
                                     logprobs=3, temperature=0)
    lp = resp.choices[0].logprobs
    assert lp.top_logprobs[0] is None
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert next(iter(top)) == token and len(top) <= 4
    ids = prompt_ids(server, prompt=PROMPT)
    expected = offline_prompt_logprobs(offline, ids, 3)
    for top, step in zip(lp.top_logprobs[1:len(ids)], expected[1:]):
        # keys are decoded texts, so two byte tokens decoding to "\ufffd" share one key
        want = {e.decoded_token: e.logprob for e in step.values()}
        assert list(top) == list(want) and list(top.values()) == pytest.approx(
            list(want.values()), abs=TOL)


TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + "
            "'\\n' }}{% endfor %}")
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "lookup", "arguments": "{\"id\": 3}"}}


def test_tool_call_history_with_null_content_renders(server):
    """vLLM 0.6.3 chat_utils.py ``_parse_chat_message_content``: ``if content is None:
    content = []``, rendered as the text ``"\\n".join([])`` == "" for templates that read
    message['content']."""
    def history(content):
        return [{"role": "user", "content": "Look up 3"},
                {"role": "assistant", "content": content, "tool_calls": [CALL]},
                {"role": "tool", "content": "found", "tool_call_id": "call_1"}]
    with_null = prompt_ids(server, messages=history(None), chat_template=TEMPLATE)
    assert with_null == prompt_ids(server, messages=history(""), chat_template=TEMPLATE)
    resp = post(server, "/v1/chat/completions", {"model": MODEL, "messages": history(None),
                                                 "chat_template": TEMPLATE, "max_tokens": 2})
    assert resp.status_code == 200, resp.text


def test_named_tool_call_answers_empty_content(server):
    """vLLM 0.6.3 serving_chat.py, named tool choice: ``message = ChatMessage(role=role,
    content="", tool_calls=[ToolCall(...)])``."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
                                                "maximum": 9}},
        "required": ["id"], "additionalProperties": False}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Look up"}],
            "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "max_tokens": 40}
    message = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message["content"] == "" and message["tool_calls"][0]["function"]["name"] == "lookup"


@pytest.mark.parametrize("path, body, names", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temprature": 0.5}, "temprature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stream_option": {}}, "stream_option"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "contents": "y"}]},
     "messages[0]: unknown field(s) contents"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stream": True, "stream_options": {"include_usag": True}},
     "include_usag"),
    ("/tokenize", {"prompt": PROMPT, "add_special_token": False}, "add_special_token"),
])
def test_unknown_fields_are_400(server, path, body, names):
    """vLLM 0.6.3 protocol.py ``class OpenAIBaseModel``: ``model_config =
    ConfigDict(extra="forbid")``; messages are typed dicts of known keys."""
    resp = post(server, path, {"model": MODEL, **body})
    assert resp.status_code == 400
    error = resp.json()
    assert error["object"] == "error" and names in error["message"]


def test_metrics_tpot_per_token_and_throughput(server, client):
    """vLLM 0.6.3 engine/metrics.py observes ``time_per_output_tokens`` per decode step
    (``Histogram ... for datum in stats.time_per_output_tokens_iter``), so a request of N
    tokens adds N - 1 samples; ``vllm:avg_generation_throughput_toks_per_s`` and
    ``vllm:cpu_prefix_cache_hit_rate`` are gauges (-1: no CPU prefix cache)."""
    name = "vllm:time_per_output_token_seconds_count"
    for stream in (False, True):
        before = server.metrics()
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, stream=stream,
                                        extra_body={"ignore_eos": True})
        if stream:
            list(out)
        after = server.metrics()
        assert after[name] - before[name] == 5
    assert after["vllm:avg_generation_throughput_toks_per_s"] > 0
    assert after["vllm:avg_prompt_throughput_toks_per_s"] > 0
    assert after["vllm:cpu_prefix_cache_hit_rate"] == -1


def test_vllm_api_key_environment_variable(model_path, monkeypatch):
    """vLLM 0.6.3 api_server.py: ``if token := envs.VLLM_API_KEY or args.api_key:`` the /v1
    routes need ``Authorization: Bearer <token>`` (the variable wins over the flag)."""
    monkeypatch.setenv("VLLM_API_KEY", "env-key")
    with RemoteServer(model_path, ["--served-model-name", MODEL, "--max-model-len", "64",
                                   "--api-key", "flag-key"]) as remote:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
        assert httpx.post(f"{remote.url}/v1/completions", json=body).status_code == 401
        for key, status in (("flag-key", 401), ("env-key", 200)):
            resp = httpx.post(f"{remote.url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == status
        assert "read VLLM_API_KEY: honoured" in remote.log()
