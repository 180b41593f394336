"""Prompt adapters (PEFT prompt tuning) against Hugging Face transformers fed the same soft
prompt through ``inputs_embeds`` (the oracle): greedy tokens equal, per adapter and mixed
with plain requests in one batch; prefix caching keeps adapters apart; bad requests and
flags fail clearly."""
import json

import pytest
import torch

from pagedllm import LLM, PromptAdapterRequest, SamplingParams
from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

ENGINE = dict(enable_prompt_adapter=True, max_prompt_adapter_token=8, dtype="float32")


def _adapter(tmp_path, name: str, num_virtual: int, hidden: int, seed: int) -> str:
    from safetensors.torch import save_file
    path = tmp_path / name
    path.mkdir()
    gen = torch.Generator().manual_seed(seed)
    save_file({"prompt_embeddings": torch.randn(num_virtual, hidden, generator=gen) * 0.5},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": num_virtual, "token_dim": hidden,
         "task_type": "CAUSAL_LM"}))
    return str(path)


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


def _hf_greedy(model, adapter_dir: str | None, ids: list[int], n: int) -> list[int]:
    from safetensors.torch import load_file
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    if adapter_dir is not None:
        soft = load_file(f"{adapter_dir}/adapter_model.safetensors")["prompt_embeddings"]
        embeds = torch.cat([soft[None], embeds], dim=1)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]),
                             max_new_tokens=n, do_sample=False)
    return out[0, -n:].tolist()


def test_greedy_tokens_equal_hf_with_the_soft_prompt(model_path, tmp_path):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hidden = hf.config.hidden_size
    # a and c: same length, so the same token ids: only the hash salt keeps their KV apart
    dirs = [_adapter(tmp_path, "a", 5, hidden, 1), _adapter(tmp_path, "b", 8, hidden, 2),
            _adapter(tmp_path, "c", 5, hidden, 3)]
    reqs = [PromptAdapterRequest("a", 1, dirs[0], 5), PromptAdapterRequest("b", 2, dirs[1], 8),
            PromptAdapterRequest("c", 3, dirs[2], 5)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (7, 19)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # prefix caching on and a small block: the same prompt under each adapter and none
    llm = LLM(model=model_path, enable_prefix_caching=True, block_size=8, **ENGINE)
    for adapter_dir, req in [(None, None)] + list(zip(dirs, reqs)):
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False,
                            prompt_adapter_request=req)
        for ids, out in zip(prompts, outs):
            assert list(out.outputs[0].token_ids) == _hf_greedy(hf, adapter_dir, ids, 12)
            virtual = req.prompt_adapter_num_virtual_tokens if req else 0
            assert list(out.prompt_token_ids) == [0] * virtual + ids  # vLLM's placeholders


def test_adapters_share_batches_up_to_max_prompt_adapters(model_path, tmp_path):
    """Requests of three adapters and none, added together with --max-prompt-adapters 2:
    every output equals the one the request gets alone."""
    from pagedllm.engine.engine import LLMEngine
    llm = LLM(model=model_path, max_prompt_adapters=2, **ENGINE)
    hidden = llm.llm_engine.config.model.hf_config.hidden_size
    reqs = [PromptAdapterRequest(n, i + 1, _adapter(tmp_path, n, 3 + i, hidden, 10 + i), 3 + i)
            for i, n in enumerate("xyz")] + [None]
    ids = list(range(5, 20))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [list(llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False,
                               prompt_adapter_request=r)[0].outputs[0].token_ids) for r in reqs]
    engine: LLMEngine = llm.llm_engine
    for i, r in enumerate(reqs * 2):
        engine.add_request(f"m{i}", {"prompt_token_ids": ids}, params, prompt_adapter_request=r)
    done, most = {}, 0
    while engine.has_unfinished_requests():
        sched = engine.scheduler
        outs = engine.step()
        for o in outs:
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
        most = max(most, len({r.prompt_adapter_request.prompt_adapter_id
                              for r in sched.running if r.prompt_adapter_request is not None}))
    assert [done[f"m{i}"] for i in range(8)] == alone * 2
    assert most <= 2


def test_prompt_adapter_errors(model_path, tmp_path):
    llm = LLM(model=model_path, **ENGINE)
    hidden = llm.llm_engine.config.model.hf_config.hidden_size
    ok = _adapter(tmp_path, "ok", 4, hidden, 3)
    with pytest.raises(ValueError, match="does not match"):
        llm.generate(["x"], prompt_adapter_request=PromptAdapterRequest("ok", 1, ok, 3))
    big = _adapter(tmp_path, "big", 9, hidden, 4)
    with pytest.raises(ValueError, match="--max-prompt-adapter-token is 8"):
        llm.generate(["x"], prompt_adapter_request=PromptAdapterRequest("big", 2, big, 9))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(["x"], prompt_adapter_request=PromptAdapterRequest("no", 3, str(tmp_path),
                                                                        4))
    llm.generate(["x"], prompt_adapter_request=PromptAdapterRequest("ok", 4, ok, 4))
    with pytest.raises(ValueError, match="already in use"):
        llm.generate(["x"], prompt_adapter_request=PromptAdapterRequest("other", 4, big, 9))
    plain = LLM(model=model_path, dtype="float32")
    with pytest.raises(ValueError, match="needs --enable-prompt-adapter"):
        plain.generate(["x"], prompt_adapter_request=PromptAdapterRequest("ok", 1, ok, 4))
    with pytest.raises(ValueError, match="--max-prompt-adapter-token"):
        LLM(model=model_path, enable_prompt_adapter=True)
    with pytest.raises(ValueError, match="OPTForCausalLM does not support prompt adapters"):
        LLM(model=str(build_tiny_model("opt")), **ENGINE)


def test_server_serves_prompt_adapters_by_model_name(model_path, tmp_path):
    import httpx
    openai = pytest.importorskip("openai")  # not in the GPU image

    from pagedllm.config import PromptAdapterConfig
    from pagedllm.entrypoints.openai.api_server import prompt_adapter_requests
    from tests.utils.server import RemoteServer
    llm = LLM(model=model_path, max_model_len=128, enable_prompt_adapter=True,
              max_prompt_adapter_token=8)
    hidden = llm.llm_engine.config.model.hf_config.hidden_size
    soft = _adapter(tmp_path, "soft", 6, hidden, 9)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [llm.generate(["The for statement"], params, use_tqdm=False,
                         prompt_adapter_request=req)[0].outputs[0].text
            for req in (None, PromptAdapterRequest("soft", 1, soft, 6))]
    assert want[0] != want[1]  # the soft prompt changes the continuation
    del llm
    args = ["--max-model-len", "128", "--enable-prompt-adapter", "--max-prompt-adapter-token",
            "8", "--prompt-adapters", f"soft={soft}"]
    with RemoteServer(model_path, args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        got = [client.completions.create(model=name, prompt="The for statement", max_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
               for name in (model_path, "soft")]
        assert [g.choices[0].text for g in got] == want
        assert got[1].model == "soft"
        assert got[1].usage.prompt_tokens == got[0].usage.prompt_tokens + 6
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        assert ids == [model_path, "soft"]
    with pytest.raises(ValueError, match="needs --enable-prompt-adapter"):
        prompt_adapter_requests([("soft", soft)], PromptAdapterConfig())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        prompt_adapter_requests([("x", str(tmp_path))], PromptAdapterConfig(True, 1, 8))


def test_pipeline_stages_read_the_soft_prompt_by_its_id(model_path, tmp_path):
    """pp=2 (mp executor, gloo on CPU): the scheduler sends only the adapter's request (id,
    path); each stage resolves it in its own store (the second stage's worker process reads
    the checkpoint itself). Greedy tokens equal Hugging Face fed the soft prompt (the
    oracle)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    soft = _adapter(tmp_path, "pp", 4, hf.config.hidden_size, 5)
    ids = list(range(5, 16))
    llm = LLM(model=model_path, pipeline_parallel_size=2, device="cpu",
              num_gpu_blocks_override=32, max_model_len=128, **ENGINE)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        plain = list(llm.generate(prompt_token_ids=[ids], sampling_params=params,
                                  use_tqdm=False)[0].outputs[0].token_ids)
        out = llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False,
                           prompt_adapter_request=PromptAdapterRequest("pp", 1, soft, 4))[0]
    finally:
        llm.llm_engine.executor.shutdown()
    assert plain == _hf_greedy(hf, None, ids, 8)
    assert list(out.outputs[0].token_ids) == _hf_greedy(hf, soft, ids, 8)
