"""DeepSeek-V2 / DeepSeek-V3 (multi-head latent attention + DeepSeekMoE) against Hugging Face
transformers (the oracle), fp32 CPU.

Tiny seeded random checkpoints (``save_pretrained``: one tensor per expert on disk) cover:
- ``deepseek_v2``: ``q_lora_rank`` None (``q_proj``), softmax router with
  ``group_limited_greedy`` (best 2 of 4 groups), 2 shared experts, a dense first layer
  (``first_k_dense_replace``), ``routed_scaling_factor``, plain RoPE;
- ``deepseek_v3``: ``q_lora_rank`` set (``q_a_proj``/``q_a_layernorm``/``q_b_proj``),
  sigmoid router with ``e_score_correction_bias`` (random, so it changes choices), groups
  ranked by their top-2 sum, renormalised and scaled weights, one shared expert, YaRN RoPE
  with ``mscale`` / ``mscale_all_dim`` (cos/sin and softmax scale), interleaved rotary.

1. Greedy tokens of ``LLM.generate`` over a batch of prompts of 3..40 tokens equal HF
   ``generate`` per prompt: plain (prefills expand the latents, decodes run absorbed over the
   latent cache); with prefix caching + chunked prefill (run twice: cache hits); with
   recompute and swap preemption (a cache of 24 blocks of 8); with tensor parallelism 2
   (gloo; heads split, the latent cache replicated) and pipeline parallelism 2 on CPU.
2. The cache holds ``kv_lora_rank + qk_rope_head_dim`` values per token and layer (one latent
   "head"), not expanded K/V heads; ``--kv-cache-dtype fp8`` is refused naming the flag.
3. Variants the checkpoints do not cover (V2 with ``q_lora_rank`` and greedy top-k; V3 with
   neox rotary, one of two groups, two shared experts): one batched prefill's last-position
  log-probs equal HF
   (atol 1e-4), loading HF's in-memory (stacked experts) state dict.
4. The absorbed decode equals the expanded form on random tensors (``attention/mla.py``).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.models.test_models_vs_hf import PROMPT_LENS, _prompts
from tests.models.test_moe_models import (MAX_TOKENS, _generate, _hf_from_config, _hf_greedy,
                                          build_tiny_checkpoint,
                                          _shared_prefix_prompts)
from tests.utils.tiny_models import CACHE_DIR, VOCAB_SIZE

_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2, pad_token_id=0, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               num_hidden_layers=3, first_k_dense_replace=1, num_experts_per_tok=2,
               tie_word_embeddings=False)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 0.8}


def _configs() -> dict:
    from transformers import DeepseekV2Config, DeepseekV3Config
    return {
        "deepseek_v2": DeepseekV2Config(
            q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, n_group=4, topk_group=2,
            topk_method="group_limited_greedy", routed_scaling_factor=1.5, **_COMMON),
        "deepseek_v3": DeepseekV3Config(
            q_lora_rank=24, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5, rope_parameters=_YARN,
            rope_interleave=True, **_COMMON),
    }


def _variant_configs() -> dict:
    from transformers import DeepseekV2Config, DeepseekV3Config
    return {
        "v2-q-lora-greedy": DeepseekV2Config(
            q_lora_rank=24, n_routed_experts=4, n_shared_experts=1, topk_method="greedy",
            **{**_COMMON, "first_k_dense_replace": 0}),
        "v3-neox-rope-top1-group": DeepseekV3Config(
            q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, n_group=2, topk_group=1,
            rope_interleave=False, **_COMMON),
    }


ARCHITECTURES = sorted(_configs())


def _randomize_bias(model) -> None:
    """HF initialises V3's correction bias to zeros; a random one changes which experts win,
    so its loading and its choose-but-do-not-weight role are exercised."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=torch.Generator().manual_seed(7)) * 0.5)


def _hf_model(config):
    model = _hf_from_config(config)
    _randomize_bias(model)
    return model


def build_tiny_deepseek(name: str, root: Path = CACHE_DIR) -> Path:
    """Save (once) the tiny checkpoint ``name`` (with its random router bias) and the tiny
    tokenizer."""
    return build_tiny_checkpoint(name, _configs()[name], root, _hf_model, "deepseek-v1")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(arch) -> str:
    return str(build_tiny_deepseek(arch))


@pytest.fixture(scope="module")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # ignore EOS, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokens(hf_model) -> list[list[int]]:
    return _hf_greedy(hf_model, _prompts())


def test_greedy_matches_hf(model_path, hf_tokens):
    assert _generate(model_path, _prompts(), block_size=8) == hf_tokens


def test_prefix_caching_and_chunked_prefill_match_hf(model_path, hf_model):
    prompts = _shared_prefix_prompts()
    tokens = _generate(model_path, prompts, block_size=8, enable_prefix_caching=True,
                       enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
    assert tokens == _hf_greedy(hf_model, prompts)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_matches_hf(model_path, hf_tokens, mode):
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=model_path, dtype="float32", block_size=8, num_gpu_blocks_override=12,
              preemption_mode=mode, swap_space=0.01)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_tokens
    assert llm.llm_engine.scheduler.num_preemptions_total > 0


def test_tp2_matches_hf(model_path, hf_tokens):
    tokens = _generate(model_path, _prompts(), tensor_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256)
    assert tokens == hf_tokens


def test_pp2_matches_hf(model_path, hf_tokens):
    tokens = _generate(model_path, _prompts(), pipeline_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256,
                       enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)
    assert tokens == hf_tokens


def test_cache_holds_one_latent_per_token(model_path):
    from pagedllm.entrypoints.llm import LLM
    config = _configs()["deepseek_v3"]
    worker = LLM(model=model_path, dtype="float32", num_gpu_blocks_override=8,
                 block_size=8).llm_engine.worker
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    assert {tuple(t.shape) for t in worker.runner.cache.gpu_cache.values()} == \
        {(1, 8 * 8, 1, latent)}
    assert worker.block_bytes == config.num_hidden_layers * 8 * latent * 4
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8.*latent.*supported: auto"):
        LLM(model=model_path, dtype="float32", kv_cache_dtype="fp8")


def _prefill_logprobs(model, config, prompts) -> torch.Tensor:
    from pagedllm.attention.backend import AttentionMetadata, ForwardContext, PrefillSeq
    block_size = 8
    spec = model.kv_cache_spec(SimpleNamespace(hf_config=config), 1)
    slots, prefills, start, next_block = [], [], 0, 0
    for ids in prompts:
        blocks = list(range(next_block, next_block - (-len(ids) // block_size)))[::-1]
        next_block += len(blocks)
        slots += [blocks[i // block_size] * block_size + i % block_size for i in range(len(ids))]
        prefills.append(PrefillSeq(start, len(ids), len(ids), torch.tensor(blocks)))
        start += len(ids)
    meta = AttentionMetadata(block_size, torch.tensor(slots), 0, None, None, prefills)
    caches = [torch.zeros(spec.shape(next_block * block_size))
              for _ in range(config.num_hidden_layers)]
    with torch.no_grad():
        hidden = model(torch.tensor([t for ids in prompts for t in ids]),
                       torch.cat([torch.arange(len(ids)) for ids in prompts]),
                       ForwardContext(meta, caches))
        last = torch.tensor(PROMPT_LENS).cumsum(0) - 1
        return torch.log_softmax(model.compute_logits(hidden[last]), -1)


@pytest.mark.parametrize("variant", sorted(_variant_configs()) + ARCHITECTURES)
def test_state_dict_logits_match_hf(variant):
    from pagedllm.models.registry import resolve_model_class
    config = {**_variant_configs(), **_configs()}[variant]
    hf = _hf_model(config)
    model = resolve_model_class([type(hf).__name__])(hf.config, 512)
    state = hf.state_dict()
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, hf.config, prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)


def test_mtp_layers_in_checkpoint_are_skipped():
    """V3 checkpoints carry a multi-token-prediction layer at index num_hidden_layers."""
    from pagedllm.models.registry import resolve_model_class
    hf = _hf_model(_configs()["deepseek_v3"])
    model = resolve_model_class(["DeepseekV3ForCausalLM"])(hf.config, 512)
    state = dict(hf.state_dict())
    extra = f"model.layers.{hf.config.num_hidden_layers}.self_attn.kv_b_proj.weight"
    state[extra] = torch.zeros(3, 3)
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))


def test_absorbed_decode_equals_expanded_attention():
    """``mla_decode`` (absorbed, over the latent cache) against explicit per-head K/V."""
    from pagedllm.attention.backend import AttentionMetadata
    from pagedllm.attention.mla import mla_decode, write_latent
    gen = torch.Generator().manual_seed(0)
    heads, nope, rope, v_dim, rank, bs = 3, 8, 4, 6, 10, 4
    lens = [5, 9]
    w_kv = torch.randn(heads, nope + v_dim, rank, generator=gen, dtype=torch.float64)
    cache = torch.zeros(1, 8 * bs, 1, rank + rope, dtype=torch.float64)
    tables = torch.tensor([[3, 0, 5], [1, 6, 2]])
    latents = []
    for i, n in enumerate(lens):
        lat = torch.randn(n, rank + rope, generator=gen, dtype=torch.float64)
        slots = torch.tensor([int(tables[i, p // bs]) * bs + p % bs for p in range(n)])
        write_latent(cache, lat, slots)
        latents.append(lat)
    q_nope = torch.randn(2, heads, nope, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(2, heads, rope, generator=gen, dtype=torch.float64)
    meta = AttentionMetadata(bs, torch.tensor([0, 0]), 2, torch.tensor(lens), tables, [])
    out = mla_decode(q_nope, q_pe, cache, meta, w_kv[:, :nope], w_kv[:, nope:], 0.3)
    for i, lat in enumerate(latents):
        c, k_pe = lat.split([rank, rope], dim=-1)
        kv = torch.einsum("hdr,sr->shd", w_kv, c)
        k = torch.cat([kv[..., :nope], k_pe.unsqueeze(1).expand(-1, heads, -1)], -1)
        scores = torch.einsum("hd,shd->hs", torch.cat([q_nope[i], q_pe[i]], -1), k) * 0.3
        expected = torch.einsum("hs,shd->hd", scores.softmax(-1), kv[..., nope:])
        torch.testing.assert_close(out[i], expected, atol=1e-10, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_matches_hf(model_path, hf_tokens):
    """On the GPU: the Triton MLA decode, decode steps under CUDA graphs."""
    assert _generate(model_path, _prompts(), block_size=16, device="cuda") == hf_tokens


def test_tiny_checkpoint_has_per_expert_tensors(model_path):
    from safetensors.torch import load_file
    saved = load_file(os.path.join(model_path, "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in saved)
