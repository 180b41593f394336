"""GPT-NeoX, StarCoder2 and Gemma 3 (text) against Hugging Face transformers, fp32 CPU.

Tiny seeded random checkpoints (``save_pretrained``, tiny trained tokenizer) whose configs
exercise: GPT-NeoX's per-head interleaved ``query_key_value``, partial rotary
(``rotary_pct`` 0.5) and parallel residual; StarCoder2's LayerNorms, biases, tanh-GELU MLP
and a sliding window shorter than the prompts; Gemma 3's ``1 + weight`` q/k norms,
sliding and global layers with their own rotary bases, sandwich norms.

1. Greedy tokens of ``LLM.generate`` over prompts of 3..40 tokens equal HF's
   ``generate(do_sample=False)`` per prompt: plain, with prefix caching + chunked prefill
   (shared prefixes, run twice), at tensor-parallel size 2 and pipeline-parallel size 2
   on CPU (gloo).
2. Last-position log-probabilities of one batched prefill equal HF's forward (atol 1e-4)
   for config variants (GPT-NeoX sequential residual, full rotary; transformers-4 style
   ``embed_out`` head name).
"""
from __future__ import annotations

import pytest
import torch

from tests.models.test_models_vs_hf import _prompts
from tests.models.test_moe_models import (_COMMON, _generate, _hf_from_config, _hf_greedy,
                                          _prefill_logprobs, _shared_prefix_prompts,
                                          build_tiny_checkpoint)
from tests.utils.tiny_models import VOCAB_SIZE

_NEOX = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, hidden_size=64, num_attention_heads=4,
             intermediate_size=128, num_hidden_layers=2)


def _configs() -> dict:
    from transformers import GPTNeoXConfig, Gemma3TextConfig, Starcoder2Config
    return {
        "gpt_neox": GPTNeoXConfig(rotary_pct=0.5, **_NEOX),
        "starcoder2": Starcoder2Config(intermediate_size=128, num_hidden_layers=2,
                                       sliding_window=16, **_COMMON),
        "gemma3": Gemma3TextConfig(intermediate_size=128, num_hidden_layers=3, head_dim=32,
                                   sliding_window=8, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"], **_COMMON),
    }


def _variant_configs() -> dict:
    from transformers import GPTNeoXConfig
    return {"gpt_neox-sequential-full-rotary": GPTNeoXConfig(use_parallel_residual=False,
                                                             rotary_pct=1.0, **_NEOX)}


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


def test_greedy_matches_hf(model_path, hf_model):
    prompts = _prompts()
    assert _generate(model_path, prompts, block_size=8) == _hf_greedy(hf_model, prompts)


def test_prefix_caching_and_chunked_prefill_match_hf(model_path, hf_model):
    prompts = _shared_prefix_prompts()
    tokens = _generate(model_path, prompts, block_size=8, enable_prefix_caching=True,
                       enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
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


@pytest.mark.parametrize("variant", sorted(_variant_configs()) + ARCHITECTURES)
def test_state_dict_logits_match_hf(variant):
    """HF's in-memory state dict loads every parameter; a batched prefill gives HF's
    last-position log-probabilities. GPT-NeoX also loads its hub head name ``embed_out``."""
    from pagedllm.models.registry import resolve_model_class
    config = {**_variant_configs(), **_configs()}[variant]
    hf = _hf_from_config(config)
    hf.config._attn_implementation = "eager"
    state = dict(hf.state_dict())
    if variant.startswith("gpt_neox"):
        state["embed_out.weight"] = state.pop("lm_head.weight")
        state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    model = resolve_model_class([type(hf).__name__])(hf.config, 512)
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, hf.config, prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)
