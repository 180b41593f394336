"""A LoRA adapter directory that ships its own tokenizer (an added token) serves that adapter's
requests with it, as vLLM 0.6.3 does (``TokenizerGroup.get_lora_tokenizer``: the adapter's
``get_tokenizer(lora_request.lora_path)``, falling back to the base tokenizer): prompt
encoding, detokenization of the output, and ``/tokenize`` / ``/detokenize`` whose ``model`` is
the adapter's name (0.6.3 ``serving_tokenization.py``: ``tokenizer = await
self.engine_client.get_tokenizer(lora_request)``).

Oracles: the adapter directory's tokenizer loaded by transformers (ids and text), and Hugging
Face + PEFT for the greedy tokens of a prompt that holds the added token. The base model has
576 embedding rows for a 512-token tokenizer, so the added token (id 512) has an embedding.
"""
import httpx
import openai
import pytest
import torch

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.utils.server import RemoteServer
from tests.utils.tiny_models import build_tiny_model

peft = pytest.importorskip("peft")

ADDED = "<tool_call>"
ADDED_ID = 512
PROMPT = f"The for statement {ADDED} is used"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama-vocab576"))


@pytest.fixture(scope="module")
def adapter_dir(model_path, tmp_path_factory):
    """A PEFT LoRA (random A and B) plus the base tokenizer with one added token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("tool-lora")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert tokenizer.add_tokens([ADDED]) == 1
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def tokenizers(model_path, adapter_dir):
    from transformers import AutoTokenizer
    base, adapter = AutoTokenizer.from_pretrained(model_path), \
        AutoTokenizer.from_pretrained(adapter_dir)
    assert adapter.convert_tokens_to_ids(ADDED) == ADDED_ID
    assert base(PROMPT)["input_ids"] != adapter(PROMPT)["input_ids"]
    return base, adapter


def _hf_greedy(model_path, adapter_dir, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_offline_adapter_tokenizer(model_path, adapter_dir, tokenizers):
    """``LLM.generate`` with the adapter: the text prompt is encoded by the adapter's
    tokenizer (the added token is one id) and the greedy tokens equal HF + PEFT on those ids;
    the output text is the adapter tokenizer's decoding (an added-token id forced by
    logit_bias decodes to the token). Without the adapter the base tokenizer serves."""
    base_tok, adapter_tok = tokenizers
    llm = LLM(model=model_path, enable_lora=True, max_lora_rank=8, dtype="float32",
              max_model_len=128)
    lora = LoRARequest("tool", 1, adapter_dir)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = llm.generate([PROMPT], greedy, lora_request=lora)[0]
    assert out.prompt_token_ids == adapter_tok(PROMPT)["input_ids"]
    assert ADDED_ID in out.prompt_token_ids
    ids = out.outputs[0].token_ids
    assert list(ids) == _hf_greedy(model_path, adapter_dir, out.prompt_token_ids)
    assert out.outputs[0].text == adapter_tok.decode(ids, skip_special_tokens=True)
    forced = SamplingParams(temperature=0, max_tokens=2, logit_bias={ADDED_ID: 100.0},
                            ignore_eos=True, logprobs=1)
    out = llm.generate([PROMPT], forced, lora_request=lora)[0].outputs[0]
    assert list(out.token_ids) == [ADDED_ID, ADDED_ID]
    assert out.text == ADDED * 2
    assert out.logprobs[0][ADDED_ID].decoded_token == ADDED
    plain = llm.generate([PROMPT], greedy)[0]
    assert plain.prompt_token_ids == base_tok(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def server(model_path, adapter_dir):
    args = ["--served-model-name", "base", "--enable-lora", "--max-lora-rank", "8",
            "--lora-modules", f"tool={adapter_dir}", "--dtype", "float32",
            "--max-model-len", "128"]
    with RemoteServer(model_path, args) as remote:
        yield remote


def test_server_tokenize_detokenize(server, tokenizers):
    """``/tokenize`` and ``/detokenize`` with ``model`` = the adapter use its tokenizer; the
    base name keeps the base tokenizer (the added id is outside its vocabulary)."""
    base_tok, adapter_tok = tokenizers
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "tool", "prompt": PROMPT},
                        timeout=30).json()
    assert tokens["tokens"] == adapter_tok(PROMPT)["input_ids"]
    base = httpx.post(f"{server.url}/tokenize", json={"model": "base", "prompt": PROMPT},
                      timeout=30).json()
    assert base["tokens"] == base_tok(PROMPT)["input_ids"]
    chat = httpx.post(f"{server.url}/tokenize", timeout=30, json={
        "model": "tool", "messages": [{"role": "user", "content": ADDED}]}).json()
    assert ADDED_ID in chat["tokens"]
    text = httpx.post(f"{server.url}/detokenize", timeout=30,
                      json={"model": "tool", "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == adapter_tok.decode(tokens["tokens"])
    refused = httpx.post(f"{server.url}/detokenize", timeout=30,
                         json={"model": "base", "tokens": [ADDED_ID]})
    assert refused.status_code == 400


def test_server_completion_and_chat(server, tokenizers):
    """Completions and chat with the adapter: prompt tokens counted by its tokenizer, an
    added-token id in the output decoded to the token (also in logprobs and the stream)."""
    _, adapter_tok = tokenizers
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    bias = {str(ADDED_ID): 100}
    completion = client.completions.create(model="tool", prompt=PROMPT, max_tokens=2,
                                           temperature=0, logit_bias=bias, logprobs=1)
    assert completion.usage.prompt_tokens == len(adapter_tok(PROMPT)["input_ids"])
    assert completion.choices[0].text == ADDED * 2
    assert completion.choices[0].logprobs.tokens == [ADDED, ADDED]
    stream = client.completions.create(model="tool", prompt=PROMPT, max_tokens=2,
                                       temperature=0, logit_bias=bias, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == ADDED * 2
    messages = [{"role": "user", "content": f"say {ADDED}"}]
    chat = client.chat.completions.create(model="tool", messages=messages, max_tokens=2,
                                          temperature=0, logit_bias=bias)
    rendered = adapter_tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(adapter_tok(rendered)["input_ids"])
    assert chat.choices[0].message.content == ADDED * 2
