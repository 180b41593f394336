"""LoRA adapters against Hugging Face transformers + PEFT with the same adapter (the oracle):
greedy tokens equal per adapter, mixed with other adapters and plain requests in one batch,
with fewer slots than adapters, with prefix caching (adapters never share KV) and through
the server's --lora-modules; logprobs close; bad requests and flags fail clearly."""
import json

import pytest
import torch

from pagedllm import LLM, LoRARequest, SamplingParams
from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

peft = pytest.importorskip("peft")

ENGINE = dict(enable_lora=True, dtype="float32", max_lora_rank=16)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


def _make_lora(model_path: str, out_dir, seed: int, targets: list[str], rank: int = 8,
               rslora: bool = False) -> str:
    """A PEFT LoRA with random A and B (PEFT's init leaves B zero), saved by PEFT itself."""
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                             lora_dropout=0.0, use_rslora=rslora)
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def loras(model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [
        LoRARequest("all", 1, _make_lora(model_path, root / "all", 1, [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
        LoRARequest("qv", 2, _make_lora(model_path, root / "qv", 2, ["q_proj", "v_proj"],
                                        rank=16)),
        LoRARequest("mlp", 3, _make_lora(model_path, root / "mlp", 3, ["up_proj", "down_proj"],
                                         rank=4, rslora=True)),
    ]


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (7, 19, 33)]


@pytest.fixture(scope="module")
def reference(model_path, loras):
    """(adapter name or None, prompt index) -> HF + PEFT greedy tokens and their logprobs."""
    from transformers import AutoModelForCausalLM
    out = {}
    for lora in [None] + loras:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if lora is not None:
            model = peft.PeftModel.from_pretrained(model, lora.lora_path)
        model.eval()
        for i, ids in enumerate(_prompts()):
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, eos_token_id=None, pad_token_id=0,
                                     output_scores=True, return_dict_in_generate=True)
            tokens = gen.sequences[0, len(ids):].tolist()
            lps = [torch.log_softmax(s[0].float(), -1)[t].item()
                   for s, t in zip(gen.scores, tokens)]
            out[(lora.lora_name if lora else None, i)] = (tokens, lps)
    return out


def _check(outs, expected, what):
    for out, (tokens, lps) in zip(outs, expected):
        got = list(out.outputs[0].token_ids)
        assert got == tokens, what
        mine = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, got)]
        assert max(abs(a - b) for a, b in zip(mine, lps)) < 1e-3, what


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


def test_each_adapter_matches_peft(model_path, loras, reference):
    llm = LLM(model=model_path, **ENGINE)
    prompts = _prompts()
    for lora in [None] + loras:
        name = lora.lora_name if lora else None
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS, use_tqdm=False,
                            lora_request=lora)
        _check(outs, [reference[(name, i)] for i in range(len(prompts))], name)
    # the adapters change the model: their greedy tokens are not the base model's
    for lora in loras:
        assert any(reference[(lora.lora_name, i)][0] != reference[(None, i)][0]
                   for i in range(len(prompts))), lora.lora_name


@pytest.mark.parametrize("max_loras,steps", [(3, 1), (2, 4), (1, 1)])
def test_mixed_batches_match_peft(model_path, loras, reference, max_loras, steps):
    """Adapters and plain requests added together: one batch holds up to --max-loras
    adapters (the rest wait), slots are reused, multi-step decode keeps the rows' adapters."""
    llm = LLM(model=model_path, max_loras=max_loras, num_scheduler_steps=steps,
              max_num_seqs=6, **ENGINE)
    prompts = _prompts()
    plan = [(i % len(prompts), lora) for i, lora in
            enumerate([loras[0], None, loras[1], loras[2], loras[0], None, loras[2], loras[1]])]
    outs = llm.generate(prompt_token_ids=[prompts[i] for i, _ in plan], sampling_params=PARAMS,
                        use_tqdm=False, lora_request=[lora for _, lora in plan])
    _check(outs, [reference[(lora.lora_name if lora else None, i)] for i, lora in plan],
           f"max_loras={max_loras}")


def test_prefix_caching_keeps_adapters_apart(model_path, loras, reference):
    llm = LLM(model=model_path, enable_prefix_caching=True, block_size=8, **ENGINE)
    prompt = _prompts()[2]  # 33 tokens: four full blocks to share, if the hashes allowed it
    for lora in [None, loras[0], None, loras[1], loras[0]]:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=PARAMS, use_tqdm=False,
                           lora_request=lora)
        _check(out, [reference[(lora.lora_name if lora else None, 2)]], "prefix caching")


def test_bad_requests_and_flags(model_path, loras, tmp_path):
    from pagedllm import EngineArgs
    plain = LLM(model=model_path, dtype="float32")
    with pytest.raises(ValueError, match="needs --enable-lora"):
        plain.generate(prompt_token_ids=[[5, 6]], lora_request=loras[0], use_tqdm=False)
    llm = LLM(model=model_path, dtype="float32", enable_lora=True, max_lora_rank=8)
    with pytest.raises(ValueError, match="rank 16 is greater than --max-lora-rank 8"):
        llm.generate(prompt_token_ids=[[5, 6]], lora_request=loras[1], use_tqdm=False)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(prompt_token_ids=[[5, 6]], use_tqdm=False,
                     lora_request=LoRARequest("missing", 9, str(tmp_path / "nowhere")))
    llm.generate(prompt_token_ids=[[5, 6]], lora_request=loras[0], use_tqdm=False)
    with pytest.raises(ValueError, match="already in use"):
        llm.generate(prompt_token_ids=[[5, 6]], use_tqdm=False,
                     lora_request=LoRARequest("other", 1, loras[2].lora_path))
    bad = tmp_path / "head"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["lm_head"]}))
    from safetensors.torch import save_file
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(VOCAB_SIZE, 4)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="targets a module LoRA cannot adapt"):
        llm.generate(prompt_token_ids=[[5, 6]], use_tqdm=False,
                     lora_request=LoRARequest("head", 5, str(bad)))
    hidden = llm.llm_engine.config.model.hf_config.hidden_size
    other = tmp_path / "other"  # an adapter of a model with another hidden size
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(4, hidden * 2),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.zeros(hidden * 2, 4)}, str(other / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="adapter of this model"):
        llm.generate(prompt_token_ids=[[5, 6]], use_tqdm=False,
                     lora_request=LoRARequest("other-model", 6, str(other)))
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], use_tqdm=False,  # the engine lives on
                       sampling_params=SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    for kwargs, match in [({"max_loras": 2}, "--max-loras needs --enable-lora"),
                          ({"enable_lora": True, "max_lora_rank": 12}, "max-lora-rank"),
                          ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2},
                           "--max-cpu-loras"),
                          ({"enable_lora": True, "lora_extra_vocab_size": 512},
                           "lora-extra-vocab-size"),
                          ({"enable_lora": True, "tensor_parallel_size": 2},
                           "--tensor-parallel-size 1")]:
        with pytest.raises(ValueError, match=match):
            EngineArgs(model=model_path, **kwargs).create_engine_config()


def _per_model_metrics(text: str) -> dict:
    """(started | ended, served_model_name) -> count, from pagedllm's per-model counters."""
    import re
    found = {}
    for kind, served, value in re.findall(
            r'^pagedllm:model_requests_(started|ended)_total\{[^}]*served_model_name="([^"]*)"'
            r'[^}]*\} (\S+)$', text, re.M):
        found[(kind, served)] = float(value)
    return found


def test_server_lora_modules(model_path, loras):
    """--lora-modules: /v1/models lists the adapter under the base model; a completion
    naming it gets the offline engine's LoRA text (that engine is checked against PEFT)."""
    import httpx
    openai = pytest.importorskip("openai")  # not in the GPU image

    from pagedllm.config import LoRAConfig
    from pagedllm.entrypoints.openai.api_server import lora_module_requests
    from tests.utils.server import RemoteServer
    llm = LLM(model=model_path, max_model_len=128, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [llm.generate(["The for statement"], params, use_tqdm=False,
                         lora_request=req)[0].outputs[0].text for req in (None, loras[0])]
    assert want[0] != want[1]
    del llm
    args = ["--max-model-len", "128", "--dtype", "float32", "--enable-lora",
            "--lora-modules", f"all={loras[0].lora_path}"]
    with RemoteServer(model_path, args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        got = [client.completions.create(model=name, prompt="The for statement", max_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
               for name in (model_path, "all")]
        assert [g.choices[0].text for g in got] == want
        assert got[1].model == "all"
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [(model_path, None),
                                                             ("all", model_path)]
        # per served model counts (the dashboard's table): one request each, both ended
        client.completions.create(model="all", prompt="x", max_tokens=2, temperature=0)
        per_model = _per_model_metrics(httpx.get(f"{server.url}/metrics").text)
        assert per_model == {("started", model_path): 1, ("ended", model_path): 1,
                             ("started", "all"): 2, ("ended", "all"): 2}, per_model
    with pytest.raises(ValueError, match="needs --enable-lora"):
        lora_module_requests([("all", loras[0].lora_path)], LoRAConfig(), None)
    from transformers import AutoConfig
    hf_config = AutoConfig.from_pretrained(model_path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lora_module_requests([("x", "/nonexistent")], LoRAConfig(enable_lora=True), hf_config)
