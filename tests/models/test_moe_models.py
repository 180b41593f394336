"""Mixtral, Qwen2-MoE and Qwen3-MoE against Hugging Face transformers (the oracle), fp32 CPU.

Each architecture is a tiny seeded random checkpoint written by transformers'
``save_pretrained`` (hub layout: one tensor per expert and projection) with the trained
tiny tokenizer of ``tests/utils/tiny_models.py``. Configs exercise: Mixtral's renormalised
top-2 of 4 experts; Qwen2-MoE's shared expert and its sigmoid gate, a dense layer from
``mlp_only_layers``, no renormalisation, q/k/v bias; Qwen3-MoE's q/k norms, renormalised
top-2 of 8, a tied LM head.

1. Greedy tokens of ``LLM.generate`` over a batch of prompts of 3..40 tokens equal HF
   ``generate(do_sample=False)`` run per prompt: plain, with prefix caching + chunked
   prefill (small token budget, shared prefixes, run twice so the second run hits the
   cache), with tensor parallelism 2 on CPU (gloo, mp executor), where each rank must
   hold half of every expert, and with pipeline parallelism 2 (chunked prefill).
2. Last-position log-probabilities of one batched prefill equal HF's forward (atol 1e-4)
   for config variants the checkpoints do not cover (``decoder_sparse_step``, top-1, a
   dense first layer), loading the stacked ``experts.gate_up_proj`` layout transformers 5 keeps in
   memory; that layout and the per-expert one load identical parameters.
3. An unknown architecture fails with an error listing the supported ones (MoE included).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.models.test_models_vs_hf import PROMPT_LENS, _prefill_context, _prompts
from tests.utils.tiny_models import CACHE_DIR, VOCAB_SIZE, cached_checkpoint

MAX_TOKENS = 16
_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2, pad_token_id=0, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2)


def _configs() -> dict:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    return {
        "mixtral": MixtralConfig(intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                                 num_experts_per_tok=2, **_COMMON),
        "qwen2_moe": Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, num_hidden_layers=3,
                                    num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                                    tie_word_embeddings=False, **_COMMON),
        "qwen3_moe": Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, head_dim=32,
                                    num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=True, tie_word_embeddings=True, **_COMMON),
    }


def _variant_configs() -> dict:
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig
    return {
        "qwen2_moe-sparse-step-2": Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=16,
            num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
            norm_topk_prob=True, **_COMMON),
        "qwen3_moe-top-1-dense-first": Qwen3MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_experts=4,
            num_experts_per_tok=1, mlp_only_layers=[0], **_COMMON),
    }


ARCHITECTURES = sorted(_configs())


def _randomize(model, init_std: float) -> None:
    """Large weights so that logits have clear gaps (greedy choices do not flip on float
    rounding); norms and biases perturbed too, so their loading is checked."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std)
            else:
                param.add_(torch.empty_like(param).uniform_(-0.2, 0.2))


def _hf_from_config(config, init_std: float = 0.15):
    from transformers import AutoModelForCausalLM
    config.initializer_range = init_std
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, init_std)
    return model.eval()


def build_tiny_checkpoint(name: str, config, root: Path = CACHE_DIR, make_model=None,
                          tag: str = "moe-v1") -> Path:
    """Save (once) a tiny random checkpoint of ``config`` (``make_model(config)``, default
    ``_hf_from_config``) with the tiny tokenizer; the directory name carries a digest of the
    config and the recipe ``tag``, so a changed config never reuses a stale one."""
    recipe = f"{config.to_json_string()}|{tag}|{VOCAB_SIZE}"
    return cached_checkpoint(root, name, recipe, lambda staging: (
        make_model or _hf_from_config)(config).save_pretrained(staging))


def build_tiny_moe(name: str) -> Path:
    return build_tiny_checkpoint(name, _configs()[name])


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(arch) -> str:
    return str(build_tiny_moe(arch))


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # ignore EOS, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model.eval()


def _hf_greedy(hf_model, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for ids in prompts:  # one at a time: no padding in the oracle
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=MAX_TOKENS, do_sample=False)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def _shared_prefix_prompts() -> list[list[int]]:
    """Four prompts: two share a 20-token prefix (prefix-cache hits across requests)."""
    base = _prompts()
    return [base[3][:20] + base[0], base[3][:20] + base[1], base[2], base[3]]


def _generate(model_path: str, prompts: list[list[int]], **flags) -> list[list[int]]:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=model_path, dtype="float32", **flags)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        runs = [[list(o.outputs[0].token_ids) for o in
                 llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
                for _ in range(2 if flags.get("enable_prefix_caching") else 1)]
    finally:
        executor = getattr(llm.llm_engine, "executor", None)
        multi_rank = flags.get("tensor_parallel_size", 1) * flags.get("pipeline_parallel_size", 1)
        if multi_rank > 1 and executor is not None:
            executor.shutdown()
    assert all(run == runs[0] for run in runs)
    return runs[0]


def test_greedy_matches_hf(model_path, hf_model):
    prompts = _prompts()
    assert _generate(model_path, prompts, block_size=8) == _hf_greedy(hf_model, prompts)


def test_prefix_caching_and_chunked_prefill_match_hf(model_path, hf_model):
    prompts = _shared_prefix_prompts()
    tokens = _generate(model_path, prompts, block_size=8, enable_prefix_caching=True,
                       enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
    assert tokens == _hf_greedy(hf_model, prompts)


def _rank_numel(worker) -> tuple[int, int]:
    """(elements of this rank's stacked expert parameters, of all its parameters)."""
    params = dict(worker.runner.model.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    return experts, sum(p.numel() for p in params.values())


def test_tp2_matches_hf_and_ranks_hold_half_of_each_expert(model_path, hf_model):
    from safetensors.torch import load_file

    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    prompts = _prompts()
    llm = LLM(model=model_path, dtype="float32", tensor_parallel_size=2, device="cpu",
              num_gpu_blocks_override=64, max_model_len=256)
    try:
        outs = llm.generate(prompt_token_ids=prompts, use_tqdm=False, sampling_params=
                            SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        numels = llm.llm_engine.executor.collective_rpc(_rank_numel)
    finally:
        llm.llm_engine.executor.shutdown()
    assert [list(o.outputs[0].token_ids) for o in outs] == _hf_greedy(hf_model, prompts)
    state = load_file(os.path.join(model_path, "model.safetensors"))
    expert_numel = sum(t.numel() for n, t in state.items() if ".experts." in n)
    assert [n[0] for n in numels] == [expert_numel // 2] * 2


def test_pp2_matches_hf(model_path, hf_model):
    """Two pipeline stages (gloo, CPU) with chunked prefill: the stages hand the hidden
    states and residual on; the MoE layers live on the stage of their layer."""
    prompts = _prompts()
    tokens = _generate(model_path, prompts, pipeline_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256,
                       enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens == _hf_greedy(hf_model, prompts)


def _prefill_logprobs(model, config, prompts) -> torch.Tensor:
    from types import SimpleNamespace
    heads = config.num_attention_heads
    model_config = SimpleNamespace(num_kv_heads=getattr(config, "num_key_value_heads", heads),
                                   head_dim=getattr(config, "head_dim", None)
                                   or config.hidden_size // heads,
                                   num_hidden_layers=config.num_hidden_layers)
    with torch.no_grad():
        hidden = model(torch.tensor([t for ids in prompts for t in ids]),
                       torch.cat([torch.arange(len(ids)) for ids in prompts]),
                       _prefill_context(model_config, prompts))
        last = torch.tensor(PROMPT_LENS).cumsum(0) - 1
        return torch.log_softmax(model.compute_logits(hidden[last]), -1)


@pytest.mark.parametrize("variant", sorted(_variant_configs()) + ARCHITECTURES)
def test_stacked_state_dict_logits_match_hf(variant):
    """transformers 5's in-memory (stacked) state dict loads every parameter, and one
    batched prefill gives HF's last-position log-probabilities."""
    from pagedllm.models.registry import resolve_model_class
    config = {**_variant_configs(), **_configs()}[variant]
    hf = _hf_from_config(config)
    model = resolve_model_class([type(hf).__name__])(hf.config, 512)
    state = hf.state_dict()
    assert any(n.endswith("experts.gate_up_proj") for n in state)  # the stacked layout
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, hf.config, prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)


def test_per_expert_checkpoint_and_stacked_state_dict_load_identically(arch):
    """The saved (per-expert, hub-named) checkpoint and HF's stacked in-memory weights give
    the same parameters; a checkpoint missing one expert's tensor is reported missing."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pagedllm.layers.moe import per_expert_target
    from pagedllm.models.registry import resolve_model_class
    path = build_tiny_moe(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    saved = load_file(str(path / "model.safetensors"))
    assert any(".experts.0." in n for n in saved)  # one tensor per expert on disk
    models = [resolve_model_class(hf.config.architectures)(hf.config, 512) for _ in range(2)]
    loaded = [m.load_weights(s.items()) for m, s in zip(models, (saved, hf.state_dict()))]
    assert loaded[0] == loaded[1] == set(dict(models[0].named_parameters()))
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), n
    dropped = next(n for n in saved if ".experts.1." in n)
    partial = resolve_model_class(hf.config.architectures)(hf.config, 512)
    missing = set(dict(partial.named_parameters())) - partial.load_weights(
        (n, t) for n, t in saved.items() if n != dropped)
    # (Mixtral's hub name of the block, block_sparse_moe, is the model's mlp)
    assert missing == {per_expert_target(dropped.replace(".block_sparse_moe.", ".mlp."))[0]}


def test_unknown_architecture_lists_supported(tmp_path):
    from pagedllm.entrypoints.llm import LLM
    path = Path(build_tiny_moe("qwen3_moe"))
    for item in path.iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "config.json").unlink()
    config = (path / "config.json").read_text().replace('"Qwen3MoeForCausalLM"',
                                                        '"NoSuchMoeForCausalLM"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"NoSuchMoeForCausalLM.*not supported; supported: "
                                         r".*MixtralForCausalLM.*Qwen2MoeForCausalLM.*"
                                         r"Qwen3MoeForCausalLM"):
        LLM(model=str(tmp_path), dtype="float32")
