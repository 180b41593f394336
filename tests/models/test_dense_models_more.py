"""Falcon, GPT-J, OLMo, OLMo 2, InternLM2, Cohere and EXAONE against Hugging Face
transformers (the oracle), fp32 CPU.

Tiny seeded random checkpoints (``save_pretrained``, tiny trained tokenizer) whose configs
exercise each architecture's own pieces (see ``_configs``). For each checkpoint:

1. Greedy tokens of ``LLM.generate`` over prompts of 3..40 tokens equal HF's
   ``generate(do_sample=False)`` per prompt: plain; with prefix caching + chunked prefill
   (shared prefixes, run twice); with recompute preemption forced by a KV cache of 10
   blocks (the run must preempt); at tensor-parallel size 2 and pipeline-parallel size 2
   on CPU (gloo).
2. Last-position log-probabilities of one batched prefill equal HF's forward (atol 1e-4)
   for config variants the checkpoints do not cover (the other Falcon decoder layouts, ...),
   loading HF's in-memory state dict.
"""
from __future__ import annotations

import pytest
import torch

from tests.models.test_models_vs_hf import _prompts
from tests.models.test_moe_models import (MAX_TOKENS, _hf_from_config, _hf_greedy,
                                          _prefill_logprobs, _shared_prefix_prompts,
                                          build_tiny_checkpoint)
from tests.utils.tiny_models import VOCAB_SIZE

_BASE = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, hidden_size=64, num_attention_heads=4,
             num_hidden_layers=2)


def _falcon(**kwargs):
    from transformers import FalconConfig
    return FalconConfig(ffn_hidden_size=128, **{**_BASE, **kwargs})


def _gptj(**kwargs):
    from transformers import GPTJConfig
    base = {k: v for k, v in _BASE.items() if k != "max_position_embeddings"}
    return GPTJConfig(n_positions=512, n_inner=128, **{**base, **kwargs})


def _olmo(**kwargs):
    from transformers import OlmoConfig
    return OlmoConfig(**{**_BASE, "intermediate_size": 128, "num_key_value_heads": 2, **kwargs})


def _olmo2(**kwargs):
    from transformers import Olmo2Config
    return Olmo2Config(**{**_BASE, "intermediate_size": 128, "num_key_value_heads": 2,
                          **kwargs})


def _configs() -> dict:
    return {
        # Falcon-40B layout: grouped query_key_value, ln_attn + ln_mlp, biases
        "falcon": _falcon(new_decoder_architecture=True, num_kv_heads=2, bias=True),
        # interleaved rotary on half of each head (rotary_dim 8 of 16), LM head bias
        "gptj": _gptj(rotary_dim=8),
        # parameter-free LayerNorms, clamped q/k/v, GQA
        "olmo": _olmo(clip_qkv=0.5),
        # norms after attention / MLP, q/k norms over whole projections (split at tp=2)
        "olmo2": _olmo2(),
    }


def _variant_configs() -> dict:
    return {
        # falcon-7b: multi-query, one shared LayerNorm, parallel attention
        "falcon-multi-query-parallel": _falcon(multi_query=True, parallel_attn=True,
                                               tie_word_embeddings=False),
        # falcon-rw style (with rotary): per-head interleaved q/k/v, sequential blocks
        "falcon-mha-sequential": _falcon(multi_query=False, parallel_attn=False, bias=True),
        # Falcon2-11B: the new layout with one LayerNorm per layer
        "falcon-new-one-ln": _falcon(new_decoder_architecture=True, num_kv_heads=1,
                                     num_ln_in_parallel_attn=1, activation="gelu_new"),
        "gptj-full-rotary": _gptj(rotary_dim=16, activation_function="gelu"),
        "olmo-no-clip-tied-bias": _olmo(tie_word_embeddings=True, attention_bias=True),
        "olmo2-mha-tied": _olmo2(num_key_value_heads=4, tie_word_embeddings=True),
    }


ARCHITECTURES = sorted(_configs())


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(arch) -> str:
    return str(build_tiny_checkpoint(arch, _configs()[arch]))


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.generation_config.eos_token_id = None  # ignore EOS, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model.eval()


def _generate(model_path: str, prompts: list[list[int]], min_preemptions: int = 0,
              **flags) -> list[list[int]]:
    """Greedy tokens (twice with prefix caching: the second run hits the cache)."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=model_path, dtype="float32", **flags)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        runs = [[list(o.outputs[0].token_ids) for o in
                 llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
                for _ in range(2 if flags.get("enable_prefix_caching") else 1)]
        if min_preemptions:
            assert llm.llm_engine.scheduler.num_preemptions_total >= min_preemptions
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


def test_preemption_matches_hf(model_path, hf_model):
    prompts = _prompts()  # 20 blocks of 8 at their longest; 10 force recompute preemption
    tokens = _generate(model_path, prompts, min_preemptions=1, block_size=8,
                       num_gpu_blocks_override=10, preemption_mode="recompute")
    assert tokens == _hf_greedy(hf_model, prompts)


def test_tp2_matches_hf(model_path, hf_model):
    prompts = _prompts()
    tokens = _generate(model_path, prompts, tensor_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256)
    assert tokens == _hf_greedy(hf_model, prompts)


def test_pp2_matches_hf(model_path, hf_model):
    prompts = _prompts()
    tokens = _generate(model_path, prompts, pipeline_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256,
                       enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens == _hf_greedy(hf_model, prompts)


def _hf_state(variant: str):
    config = {**_variant_configs(), **_configs()}[variant]
    hf = _hf_from_config(config)
    hf.config._attn_implementation = "eager"
    return hf, dict(hf.state_dict())


@pytest.mark.parametrize("variant", sorted(_variant_configs()) + ARCHITECTURES)
def test_state_dict_logits_match_hf(variant):
    """HF's in-memory state dict loads every parameter; a batched prefill gives HF's
    last-position log-probabilities."""
    from pagedllm.models.registry import resolve_model_class
    hf, state = _hf_state(variant)
    model = resolve_model_class([type(hf).__name__])(hf.config, 512)
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, hf.config, prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)


def test_falcon_alibi_is_a_startup_error_naming_alibi():
    from pagedllm.models.registry import resolve_model_class
    config = _falcon(alibi=True, multi_query=False, parallel_attn=False)
    with pytest.raises(ValueError, match="alibi"):
        resolve_model_class(["FalconForCausalLM"])(config, 512)
