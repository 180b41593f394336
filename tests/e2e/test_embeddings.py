"""Embedding (pooling) models, issue 20 item 10: ``LLM.encode``, ``/v1/embeddings`` (both server
modes, the official ``openai`` client) and ``/v1/embeddings`` lines of the batch runner.

Oracle: Hugging Face. Tiny seeded models saved as ``AutoModel`` saves them; the expected
embedding is vLLM 0.6.3's pooling of HF's ``last_hidden_state``: the last token's row,
L2-normalised (``Pooler(pooling_type=PoolingType.LAST, normalize=True)`` of its
``LlamaEmbeddingModel`` / ``Gemma2EmbeddingModel``), and for ``Qwen2ForRewardModel`` the score
head ``Linear -> ReLU -> Linear(1)`` on every row, unnormalised (``PoolingType.ALL,
normalize=False``). The API's shape and messages are vLLM 0.6.3's ``serving_embedding.py``
and ``tests/entrypoints/openai/test_embedding.py`` (quoted per test).
"""
import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pagedllm import LLM
from pagedllm import PoolingParams
from tests.utils.server import REPO_ROOT, RemoteServer
from tests.utils.tiny_models import build_tiny_embedding_model, build_tiny_model

PROMPTS = ["The for statement is used to iterate over the elements of a sequence",
           "Hello", "def f(x):\n    return x", "A list is a sequence of values"]
MAX_MODEL_LEN = 128
ATOL = 2e-5


def hf_reference(path, token_ids: list[int]) -> torch.Tensor:
    """vLLM 0.6.3's pooled output of HF's last hidden state for one prompt."""
    from safetensors.torch import load_file
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids])).last_hidden_state[0]  # [num_tokens, hidden]
        if model.config.architectures == ["Qwen2ForRewardModel"]:
            size = model.config.hidden_size
            score = torch.nn.Sequential(torch.nn.Linear(size, size), torch.nn.ReLU(),
                                        torch.nn.Linear(size, 1))
            tensors = load_file(f"{path}/model.safetensors")
            score.load_state_dict({k[len("score."):]: v for k, v in tensors.items()
                                   if k.startswith("score.")})
            return score(hidden)  # [num_tokens, 1]: one reward per token
        return torch.nn.functional.normalize(hidden[-1], p=2, dim=-1)


@pytest.mark.parametrize("name, chunked", [
    ("mistral-embed", False), ("llama-embed", False), ("gemma2-embed", False),
    ("qwen2-reward", False), ("mistral-embed", True), ("qwen2-reward", True)])
def test_encode_equals_hf(name, chunked):
    """``LLM.encode`` (vLLM 0.6.3: ``outputs.embedding`` of each ``EmbeddingRequestOutput``)
    equals HF's pooled hidden states, also when prompts are prefilled in chunks of 4 tokens
    (the pooler sees the last chunk's row, or every chunk's rows for the reward model)."""
    path = build_tiny_embedding_model(name)
    kwargs = dict(enable_chunked_prefill=True, max_num_batched_tokens=4, max_num_seqs=2) \
        if chunked else {}
    llm = LLM(model=str(path), dtype="float32", max_model_len=MAX_MODEL_LEN, **kwargs)
    outputs = llm.encode(PROMPTS, PoolingParams())
    assert [o.finished for o in outputs] == [True] * len(PROMPTS)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt == prompt
        expected = hf_reference(path, output.prompt_token_ids)
        got = torch.tensor(output.outputs.embedding)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if name != "qwen2-reward":
        assert abs(torch.tensor(outputs[0].outputs.embedding).norm().item() - 1) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton attention)")
@pytest.mark.parametrize("name", ["mistral-embed", "qwen2-reward"])
def test_encode_equals_hf_on_cuda(name):
    """The GPU path (Triton prefill attention, packed prefills of different lengths, graphs
    off for pooling models): fp32 results equal HF's on the CPU."""
    path = build_tiny_embedding_model(name)
    llm = LLM(model=str(path), dtype="float32", max_model_len=MAX_MODEL_LEN)
    for output in llm.encode(PROMPTS):
        expected = hf_reference(path, output.prompt_token_ids)
        torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected,
                                   atol=1e-4, rtol=0)


def test_pool_rows_kept_across_preemption():
    """ALL pooling with chunked prefill keeps each chunk's rows in the runner; a preempted
    request resumes with the rows before its computed count (a swap keeps them all, a
    recompute none), and a gap is an error rather than a wrong answer."""
    from pagedllm.worker.model_runner import ModelRunner
    runner = ModelRunner.__new__(ModelRunner)
    chunks = [torch.full((4, 1), 1.0), torch.full((4, 1), 2.0)]
    runner._pool_rows = {"r": list(chunks)}
    runner._resume_pool_rows("r", 8)  # swapped back in: both chunks stay
    assert [c[0, 0].item() for c in runner._pool_rows["r"]] == [1.0, 2.0]
    runner._resume_pool_rows("r", 0)  # recomputed from the start: nothing is kept
    assert "r" not in runner._pool_rows
    runner._pool_rows = {"r": list(chunks)}
    with pytest.raises(RuntimeError, match="rows of only 8"):
        runner._resume_pool_rows("r", 12)


def test_generate_and_encode_refuse_the_other_kind():
    """vLLM 0.6.3 ``LLM.generate``: "LLM.generate() is only supported for (conditional)
    generation models (XForCausalLM, XForConditionalGeneration)."; ``LLM.encode``:
    "LLM.encode() is only supported for embedding models (XModel)."."""
    embed = LLM(model=str(build_tiny_embedding_model("mistral-embed")), dtype="float32",
                max_model_len=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"LLM.generate\(\) is only supported for"):
        embed.generate(["Hello"])
    from pagedllm import LoRARequest
    with pytest.raises(ValueError, match="no prompt adapter or LoRA"):
        embed.encode(["Hello"], lora_request=LoRARequest("x", 1, "/nonexistent"))
    embed.llm_engine.core.shutdown()
    generative = LLM(model=str(build_tiny_model("llama")), dtype="float32",
                     max_model_len=MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"LLM.encode\(\) is only supported for embedding"):
        generative.encode(["Hello"])


def test_prefix_caching_refused_for_reward_model():
    """Every prompt row is pooled: rows of cached blocks are never computed, so the flag is
    refused at start-up, naming it."""
    with pytest.raises(ValueError, match="--enable-prefix-caching"):
        LLM(model=str(build_tiny_embedding_model("qwen2-reward")), dtype="float32",
            enable_prefix_caching=True)


@pytest.fixture(scope="module")
def embed_path():
    return str(build_tiny_embedding_model("mistral-embed"))


@pytest.fixture(scope="module")
def offline(embed_path):
    return LLM(model=embed_path, dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module", params=["core-process", "in-process"])
def client(embed_path, request):
    """Both server modes: the engine core in its own process (``core_client.py``) and
    ``--disable-frontend-multiprocessing`` (the engine thread)."""
    args = ["--served-model-name", "embed", "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN)]
    if request.param == "in-process":
        args.append("--disable-frontend-multiprocessing")
    with RemoteServer(embed_path, args) as server:
        openai = pytest.importorskip("openai")
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")


def test_server_float_embeddings_equal_encode(client, offline):
    """test_embedding.py ``test_batch_embedding``: a list of strings gives one embedding per
    input (index order); usage counts the prompt tokens, ``completion_tokens`` 0. The
    vectors equal ``LLM.encode`` (and so HF)."""
    response = client.embeddings.create(model="embed", input=PROMPTS, encoding_format="float")
    expected = offline.encode(PROMPTS)
    assert response.id.startswith("embd-") and response.object == "list"
    assert response.model == "embed"
    assert [d.index for d in response.data] == list(range(len(PROMPTS)))
    for data, output in zip(response.data, expected):
        assert data.object == "embedding"
        np.testing.assert_allclose(data.embedding, output.outputs.embedding, atol=1e-6)
    num_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.prompt_tokens == num_tokens
    assert response.usage.total_tokens == num_tokens
    assert response.usage.model_dump()["completion_tokens"] == 0


def test_server_token_id_inputs(client, offline):
    """test_embedding.py ``test_single_embedding`` (``input=[1, 1, 1, 1, 1]``: one
    embedding, 5 prompt tokens) and ``test_batch_embedding`` (``List[List[int]]``)."""
    single = client.embeddings.create(model="embed", input=[5, 6, 7, 8, 9])
    assert len(single.data) == 1 and single.usage.prompt_tokens == 5
    np.testing.assert_allclose(single.data[0].embedding,
                               offline.encode([[5, 6, 7, 8, 9]])[0].outputs.embedding, atol=1e-6)
    ids = [[4, 5, 7, 9, 20], [15, 29, 499], [24, 24, 24, 24, 24], [25, 32, 64, 77]]
    batch = client.embeddings.create(model="embed", input=ids)
    assert len(batch.data) == 4 and batch.usage.prompt_tokens == 17
    for data, output in zip(batch.data, offline.encode([list(i) for i in ids])):
        np.testing.assert_allclose(data.embedding, output.outputs.embedding, atol=1e-6)


def test_server_base64_equals_float(client):
    """test_embedding.py ``test_batch_base64_embedding``: base64 is the float32 bytes of the
    same vector (0.6.3: "Force to use float32 for base64 encoding to match the OpenAI python
    client behavior")."""
    texts = PROMPTS[:2]
    floats = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model="embed", input=texts,
                                                     encoding_format="base64")
    for data, encoded in zip(floats.data, json.loads(raw.text)["data"]):
        decoded = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="float32")
        assert decoded.shape == (len(data.embedding),)  # float32, not 0.5.x's float64
        # two requests (possibly batched differently): equal up to float rounding
        np.testing.assert_allclose(decoded, np.float32(data.embedding), atol=1e-6)
    # the client's default (no encoding_format): it asks for base64 and decodes float32
    default = client.embeddings.create(model="embed", input=texts)
    np.testing.assert_allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-7)


def test_server_rejections(client):
    """0.6.3: ``if request.dimensions is not None: return self.create_error_response(
    "dimensions is currently not supported")``; unknown fields are 400 (extra="forbid");
    ``user`` and ``additional_data`` are accepted; a completion on an embedding model is a
    400 naming the Embeddings API."""
    openai = pytest.importorskip("openai")  # not in the GPU image
    with pytest.raises(openai.BadRequestError, match="dimensions is currently not supported"):
        client.embeddings.create(model="embed", input="Hello", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="nonsense"):
        client.embeddings.create(model="embed", input="Hello", extra_body={"nonsense": 1})
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="Hello")
    ok = client.embeddings.create(model="embed", input="Hello", user="u1",
                                  extra_body={"additional_data": {"k": 1}})
    assert len(ok.data) == 1
    deep: list = []
    for _ in range(600):  # JSON parses it; pickling it to the core process would not
        deep = [deep]
    ok = client.embeddings.create(model="embed", input="Hello",
                                  extra_body={"additional_data": deep})
    assert len(ok.data) == 1
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="embed", prompt="Hello", max_tokens=2)
    too_long = list(range(3, 3 + MAX_MODEL_LEN + 1))
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.embeddings.create(model="embed", input=too_long)


def test_run_batch_embeddings(embed_path, offline, tmp_path):
    """vLLM 0.6.3 run_batch.py: ``elif request.url == "/v1/embeddings": response_future =
    run_request(openai_serving_embedding.create_embedding, ...)``; the body is the
    ``EmbeddingResponse``."""
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "embed", "input": prompt}} for i, prompt in enumerate(PROMPTS[:2])]
    lines.append({"custom_id": "dims", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "embed", "input": "x", "dimensions": 4}})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(line) for line in lines))
    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.openai.run_batch", "-i", str(inp),
         "-o", str(out), "--model", embed_path, "--served-model-name", "embed",
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {o["custom_id"]: o for o in map(json.loads, out.read_text().split("\n"))}
    expected = offline.encode(PROMPTS[:2])
    for i, output in enumerate(expected):
        body = results[f"e{i}"]["response"]["body"]
        assert results[f"e{i}"]["response"]["status_code"] == 200
        assert body["object"] == "list" and body["usage"]["prompt_tokens"] == \
            len(output.prompt_token_ids)
        np.testing.assert_allclose(body["data"][0]["embedding"], output.outputs.embedding,
                                   atol=1e-6)
    assert results["dims"]["response"]["status_code"] == 400
    assert results["dims"]["error"]["message"] == "dimensions is currently not supported"


@pytest.mark.parametrize("kind", ["thread", "core-process"])
def test_async_engines_encode(embed_path, offline, kind):
    """vLLM 0.6.3's ``AsyncLLMEngine.encode(prompt, pooling_params, request_id)``: one
    ``EmbeddingRequestOutput`` per request, from the engine thread and from the engine core
    in its own process alike, equal to ``LLM.encode``."""
    import asyncio

    from pagedllm.arg_utils import EngineArgs
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.engine.async_mp_engine import AsyncMPLLMEngine
    args = EngineArgs(model=embed_path, dtype="float32", max_model_len=MAX_MODEL_LEN)
    engine = (AsyncLLMEngine if kind == "thread" else AsyncMPLLMEngine).from_engine_args(args)

    async def encode_all():
        async def one(i, prompt):
            return [o async for o in engine.encode(prompt, PoolingParams(), f"r{i}")]
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        results = asyncio.run(encode_all())
    finally:
        engine.shutdown()
    for outputs, expected in zip(results, offline.encode(PROMPTS)):
        assert len(outputs) == 1 and outputs[0].finished
        assert outputs[0].prompt_token_ids == expected.prompt_token_ids
        np.testing.assert_allclose(outputs[0].outputs.embedding, expected.outputs.embedding,
                                   atol=1e-6)


def test_reward_model_through_the_embeddings_handler():
    """``Qwen2ForRewardModel`` through ``/v1/embeddings``'s handler (no HTTP): one reward per
    prompt token as a list of one-element lists (vLLM 0.6.3's response model cannot hold
    them: pagedllm answers them), base64 their float32 bytes row after row; both equal HF."""
    import asyncio

    from pagedllm.arg_utils import EngineArgs
    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.entrypoints.openai.run_batch import serving_context
    from pagedllm.entrypoints.openai.serving_embedding import (EmbeddingRequest,
                                                               OpenAIServingEmbedding)
    path = build_tiny_embedding_model("qwen2-reward")
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="float32",
                                                        served_model_name="rm"))
    handler = OpenAIServingEmbedding(serving_context(engine, "assistant"))

    async def ask():
        engine.start()
        return [await handler.create_embedding(EmbeddingRequest(
            model="rm", input=PROMPTS[:2], encoding_format=encoding_format), None)
            for encoding_format in ("float", "base64")]

    try:
        floats, packed = asyncio.run(ask())
    finally:
        engine.shutdown()
    tokenizer = handler.tokenizer
    for i, prompt in enumerate(PROMPTS[:2]):
        expected = hf_reference(path, tokenizer(prompt)["input_ids"])
        rewards = floats["data"][i]["embedding"]
        torch.testing.assert_close(torch.tensor(rewards), expected, atol=ATOL, rtol=0)
        raw = np.frombuffer(base64.b64decode(packed["data"][i]["embedding"]), dtype="float32")
        # (two requests: batched differently, so equal up to float rounding)
        np.testing.assert_allclose(raw, np.float32(rewards).reshape(-1), atol=1e-6)
