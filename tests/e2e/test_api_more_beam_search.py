"""``use_beam_search`` on /v1/completions and /v1/chat/completions (issue 20 item 3): the server
runs ``pagedllm.beam_search.beam_search_async`` over the async engine, one-token requests per
beam per step, as vLLM 0.6.3's front end does. Oracle: offline ``LLM.beam_search`` on the same
tiny model (which tests/unit's beam-search tests check against transformers)."""
import httpx
import pytest

from pagedllm import LLM
from pagedllm.sampling_params import BeamSearchParams
from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

MODEL = "tiny"
PROMPTS = ["The for statement", "A list is a sequence of"]
MESSAGES = [{"role": "user", "content": "What is a list?"}]
ARGS = ["--served-model-name", MODEL, "--max-model-len", "128", "--max-logprobs", "8",
        "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(model=model_path, max_model_len=128, max_logprobs=8, dtype="float32")


@pytest.fixture(scope="module")
def server(model_path):
    with RemoteServer(model_path, ARGS) as remote:
        yield remote


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def expected(offline, prompt, params, n):
    """(text, finish_reason) of LLM.beam_search's n best, generated part only."""
    tokenizer = offline.get_tokenizer()
    ids = prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
    [found] = offline.beam_search([ids], params)
    out = []
    for seq in found.sequences[:n]:
        generated = seq.tokens[len(ids):]
        stopped = not params.ignore_eos and generated[-1:] == [tokenizer.eos_token_id]
        out.append((tokenizer.decode(generated, skip_special_tokens=True),
                    "stop" if stopped else "length"))
    return out


def test_completions_beam_search_equals_offline(server, offline):
    """vLLM 0.6.3 protocol.py ``to_beam_search_params``: ``BeamSearchParams(beam_width=n,
    max_tokens=max_tokens, ignore_eos=self.ignore_eos, temperature=temperature,
    length_penalty=self.length_penalty)``; serving_completion.py runs
    ``self.engine_client.beam_search(prompt_inputs["prompt_token_ids"], ...)`` per prompt, the
    choices numbered prompt index * n + rank. Here best_of=3 widens the beam, n=2 answered."""
    body = {"model": MODEL, "prompt": PROMPTS, "use_beam_search": True, "n": 2,
            "best_of": 3, "max_tokens": 6, "temperature": 0, "length_penalty": 0.5}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    params = BeamSearchParams(beam_width=3, max_tokens=6, temperature=0.0, length_penalty=0.5)
    want = [pair for prompt in PROMPTS for pair in expected(offline, prompt, params, 2)]
    assert [(c["text"], c["finish_reason"]) for c in choices] == want
    assert len({c["text"] for c in choices[:2]}) == 2  # two different beams


def test_chat_beam_search_equals_offline(server, offline):
    """vLLM 0.6.3 serving_chat.py: ``if request.use_beam_search: sampling_params = request.
    to_beam_search_params(default_max_tokens)`` with ``temperature = self.temperature if
    self.temperature is not None else 0.0`` (chat's default 0.7 applies) and
    ``result_generator = self.engine_client.beam_search(...)`` over the templated prompt."""
    body = {"model": MODEL, "messages": MESSAGES, "use_beam_search": True, "n": 2,
            "max_tokens": 5, "ignore_eos": True}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    data = response.json()
    ids = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    params = BeamSearchParams(beam_width=2, max_tokens=5, temperature=0.7, ignore_eos=True)
    want = expected(offline, ids, params, 2)
    got = [(c["message"]["content"], c["finish_reason"]) for c in data["choices"]]
    assert got == want and all(reason == "length" for _, reason in got)
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10,
                             "total_tokens": len(ids) + 10}


@pytest.mark.parametrize("path, extra, field", [
    ("/v1/completions", {"stream": True}, "stream"),
    ("/v1/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"n": 5}, "max-logprobs"),
])
def test_beam_search_refusals(server, path, extra, field):
    """What a beam answer cannot carry is a 400 naming the field (vLLM 0.6.3 answers them
    unstreamed / with ``logprobs=beam.cum_logprob``); a beam wider than --max-logprobs / 2
    cannot get its 2 * beam_width candidates per step."""
    body = {"model": MODEL, "use_beam_search": True, "max_tokens": 3, **extra}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": MESSAGES})
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    assert field in response.json()["message"]
