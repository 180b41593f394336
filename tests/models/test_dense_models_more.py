"""Falcon, GPT-J, OLMo, OLMo 2, InternLM2, Cohere and EXAONE against Hugging Face
transformers (the oracle), fp32 CPU; InternLM2, which transformers lacks, against the
hand-written reference of ``internlm2_reference.py``.

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
3. GPTQ / AWQ checkpoints of the packed q/k/v layouts (InternLM2 ``wqkv``, Falcon's grouped
   ``query_key_value``) give the oracle's tokens on the dequantized weights.
4. On CUDA (skipped without): bf16 against the oracle in bf16, teacher-forced.
5. Start-up errors: Falcon ``alibi``, an unknown architecture, ``--quantization`` on a class
   without it (each lists what is supported).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.internlm2_reference import CONFIG as INTERNLM2_CONFIG
from tests.models.internlm2_reference import (
    build_tiny_internlm2,
    random_state,
    reference_forward,
    reference_greedy,
    reference_logits,
)
from tests.models.test_models_vs_hf import _prompts
from tests.models.test_moe_models import (
    MAX_TOKENS,
    _hf_from_config,
    _hf_greedy,
    _prefill_logprobs,
    _shared_prefix_prompts,
    build_tiny_checkpoint,
)
from tests.utils.tiny_models import VOCAB_SIZE

_BASE = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 512, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "hidden_size": 64, "num_attention_heads": 4,
             "num_hidden_layers": 2}


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


def _cohere(**kwargs):
    from transformers import CohereConfig
    return CohereConfig(**{**_BASE, "intermediate_size": 128, "num_key_value_heads": 2,
                           "logit_scale": 0.5, **kwargs})


def _exaone(**kwargs):
    """None where transformers has no ExaoneConfig (before 5.2x): those cases drop out."""
    try:
        from transformers import ExaoneConfig
    except ImportError:
        return None
    return ExaoneConfig(**{**_BASE, "intermediate_size": 128, "num_key_value_heads": 2,
                           **kwargs})


def _present(configs: dict) -> dict:
    return {name: config for name, config in configs.items() if config is not None}


def _configs() -> dict:
    return _present({
        # Falcon-40B layout: grouped query_key_value, ln_attn + ln_mlp, biases
        "falcon": _falcon(new_decoder_architecture=True, num_kv_heads=2, bias=True),
        # interleaved rotary on half of each head (rotary_dim 8 of 16), LM head bias
        "gptj": _gptj(rotary_dim=8),
        # parameter-free LayerNorms, clamped q/k/v, GQA
        "olmo": _olmo(clip_qkv=0.5),
        # norms after attention / MLP, q/k norms over whole projections (split at tp=2)
        "olmo2": _olmo2(),
        # parallel block under one LayerNorm, interleaved rotary, per-head q/k LayerNorms,
        # logit_scale, tied head
        "cohere": _cohere(use_qk_norm=True),
        # transformers runs it as Llama; the checkpoint has the hub's transformer.h.* names
        "exaone": _exaone(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                           "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}),
    })


def _variant_configs() -> dict:
    return _present({
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
        "cohere-no-qk-norm-untied-bias": _cohere(tie_word_embeddings=False,
                                                 attention_bias=True, logit_scale=0.0625),
        "exaone-tied": _exaone(tie_word_embeddings=True),
        # one KV head: replicated on both ranks at tp=2 (see test_tp2_replicated_kv_head)
        "olmo2-one-kv-head": _olmo2(num_key_value_heads=1),
        "cohere-one-kv-head": _cohere(num_key_value_heads=1, use_qk_norm=True),
    })


# the architecture name of a hub checkpoint where transformers loads another class
_HUB_ARCHITECTURE = {"exaone": "ExaoneForCausalLM"}


def _build(arch: str) -> str:
    """The tiny checkpoint of ``arch``; EXAONE's config.json names the hub architecture
    (transformers saves it as LlamaForCausalLM, with the hub's weight names)."""
    import json
    if arch == "internlm2":
        return str(build_tiny_internlm2())
    path = build_tiny_checkpoint(arch, _configs()[arch])
    if arch in _HUB_ARCHITECTURE:
        config = json.loads((path / "config.json").read_text())
        if config["architectures"] != [_HUB_ARCHITECTURE[arch]]:
            config["architectures"] = [_HUB_ARCHITECTURE[arch]]
            (path / "config.json").write_text(json.dumps(config, indent=1))
    return str(path)


# InternLM2 has no transformers class: its oracle is tests/models/internlm2_reference.py and
# its checkpoint ships its config code (loaded with trust_remote_code, as on the hub)
REMOTE_CODE = {"internlm2"}
ARCHITECTURES = sorted(_configs()) + sorted(REMOTE_CODE)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(arch) -> str:
    return _build(arch)


@pytest.fixture(scope="module")
def flags(arch) -> dict:
    return {"trust_remote_code": True} if arch in REMOTE_CODE else {}


@pytest.fixture(scope="module")
def oracle(arch, model_path):
    """prompts -> greedy tokens of the oracle (HF fp32 CPU, or the InternLM2 reference),
    computed once per prompt list."""
    if arch == "internlm2":
        from safetensors.torch import load_file
        state = load_file(f"{model_path}/model.safetensors")
        def run(prompts):
            return reference_greedy(state, prompts, MAX_TOKENS)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                     attn_implementation="eager")
        model.generation_config.eos_token_id = None  # ignore EOS, as ignore_eos does
        model.generation_config.pad_token_id = 0
        model.eval()
        def run(prompts):
            return _hf_greedy(model, prompts)
    cache: dict = {}

    def greedy(prompts: list[list[int]]) -> list[list[int]]:
        key = tuple(map(tuple, prompts))
        if key not in cache:
            cache[key] = run(prompts)
        return cache[key]

    return greedy


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


def test_greedy_matches_hf(model_path, flags, oracle):
    prompts = _prompts()
    assert _generate(model_path, prompts, block_size=8, **flags) == oracle(prompts)


def test_prefix_caching_and_chunked_prefill_match_hf(model_path, flags, oracle):
    prompts = _shared_prefix_prompts()
    tokens = _generate(model_path, prompts, block_size=8, enable_prefix_caching=True,
                       enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4,
                       **flags)
    assert tokens == oracle(prompts)


def test_preemption_matches_hf(model_path, flags, oracle):
    prompts = _prompts()  # 20 blocks of 8 at their longest; 10 force recompute preemption
    tokens = _generate(model_path, prompts, min_preemptions=1, block_size=8,
                       num_gpu_blocks_override=10, preemption_mode="recompute", **flags)
    assert tokens == oracle(prompts)


def test_tp2_matches_hf(model_path, flags, oracle):
    prompts = _prompts()
    tokens = _generate(model_path, prompts, tensor_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256, **flags)
    assert tokens == oracle(prompts)


def test_pp2_matches_hf(model_path, flags, oracle):
    prompts = _prompts()
    tokens = _generate(model_path, prompts, pipeline_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256,
                       enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4,
                       **flags)
    assert tokens == oracle(prompts)


@pytest.mark.parametrize("variant", ["falcon-multi-query-parallel", "olmo2-one-kv-head",
                                     "cohere-one-kv-head"])
def test_tp2_replicated_kv_head_matches_hf(variant):
    """One KV head at tensor-parallel size 2: both ranks hold it (falcon-7b's multi-query
    layout; OLMo 2's whole-projection k norm counts it once per rank; Cohere's per-head
    k norm row goes to both)."""
    path = str(build_tiny_checkpoint(variant, _variant_configs()[variant]))
    hf = _hf_from_config(_variant_configs()[variant])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompts = _prompts()
    tokens = _generate(path, prompts, tensor_parallel_size=2, device="cpu",
                       num_gpu_blocks_override=64, max_model_len=256)
    assert tokens == _hf_greedy(hf, prompts)


def _hf_state(variant: str):
    config = {**_variant_configs(), **_configs()}[variant]
    hf = _hf_from_config(config)
    hf.config._attn_implementation = "eager"
    return hf, dict(hf.state_dict())


@pytest.mark.parametrize("variant", sorted(_variant_configs()) + sorted(_configs()))
def test_state_dict_logits_match_hf(variant):
    """HF's in-memory state dict loads every parameter; a batched prefill gives HF's
    last-position log-probabilities."""
    from pagedllm.models.registry import resolve_model_class
    hf, state = _hf_state(variant)
    architecture = _HUB_ARCHITECTURE.get(hf.config.model_type, type(hf).__name__)
    model = resolve_model_class([architecture])(hf.config, 512)
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


@pytest.mark.parametrize("variant", [{"bias": False}, {"num_key_value_heads": 1},
                                     {"num_key_value_heads": 4, "tie_word_embeddings": True}],
                         ids=["no-bias", "one-kv-head", "mha-tied"])
def test_internlm2_state_dict_logits_match_reference(variant):
    """Other InternLM2 shapes: the hub-named state dict loads every parameter (a tied head
    from ``tok_embeddings``), and a batched prefill gives the reference's log-probabilities."""
    from types import SimpleNamespace

    from pagedllm.models.registry import resolve_model_class
    config = {**INTERNLM2_CONFIG, **variant}
    state = random_state(config)
    if config["tie_word_embeddings"]:
        state["output.weight"] = state["model.tok_embeddings.weight"]
    model = resolve_model_class(["InternLM2ForCausalLM"])(SimpleNamespace(**config), 512)
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, SimpleNamespace(**config), prompts)
    for i, ids in enumerate(prompts):
        theirs = torch.log_softmax(reference_logits(state, ids, config), -1)
        torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)


# checkpoint modules quantized per architecture (the fused q/k/v ones first)
_QUANT_MODULES = {"internlm2": ("attention.wqkv", "attention.wo", "feed_forward.w1",
                                "feed_forward.w2", "feed_forward.w3"),
                  "falcon": ("query_key_value", "self_attention.dense", "dense_h_to_4h",
                             "dense_4h_to_h")}
_QUANT_CONFIGS = {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32,
                           "desc_act": True, "sym": True},
                  "awq": {"quant_method": "awq", "bits": 4, "group_size": 32,
                          "zero_point": True, "version": "gemm"}}


def _quantized_copy(arch: str, method: str, out) -> dict:
    """A copy of the tiny checkpoint with its decoder linears quantized (the published GPTQ
    / AWQ layouts, ``tests/quant/packers.py``); returns the oracle state (each quantized
    weight replaced by its dequantized values)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.quant import packers
    src = Path(build_tiny_internlm2() if arch == "internlm2"
               else build_tiny_checkpoint(arch, _configs()[arch]))
    state = load_file(str(src / "model.safetensors"))
    oracle, written = dict(state), dict(state)
    for key, weight in state.items():
        module = key[:-len(".weight")]
        if not key.endswith(".weight") or not module.endswith(_QUANT_MODULES[arch]):
            continue
        tensors, oracle[key] = (packers.gptq_quantize(weight, desc_act=True) if method == "gptq"
                                else packers.awq_quantize(weight))
        del written[key]
        written.update({f"{module}.{name}": t for name, t in tensors.items()})
    shutil.copytree(src, out)
    save_file({k: v.contiguous() for k, v in written.items()}, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _QUANT_CONFIGS[method]
    (out / "config.json").write_text(json.dumps(config))
    return oracle


@pytest.mark.parametrize("arch,method", [("internlm2", "gptq"), ("internlm2", "awq"),
                                         ("falcon", "gptq")])
def test_quantized_fused_qkv_checkpoint_matches_oracle(arch, method, tmp_path):
    """GPTQ (act-order, output features along dim 1) and AWQ (output features packed 8 to a
    word) tensors of the packed ``wqkv`` / grouped ``query_key_value`` are reordered into
    q/k/v like dense ones: greedy tokens equal the oracle on the dequantized weights."""
    oracle_state = _quantized_copy(arch, method, tmp_path / "q")
    prompts = _prompts()
    flags = {"trust_remote_code": True} if arch in REMOTE_CODE else {}
    tokens = _generate(str(tmp_path / "q"), prompts, block_size=8, **flags)
    if arch == "internlm2":
        expected = reference_greedy(oracle_state, prompts, MAX_TOKENS)
    else:
        hf = _hf_from_config(_configs()[arch])
        missing, unexpected = hf.load_state_dict(oracle_state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        expected = _hf_greedy(hf, prompts)
    assert tokens == expected


def test_unknown_architecture_error_lists_these(tmp_path):
    from pagedllm.entrypoints.llm import LLM
    path = _build("falcon")
    for item in Path(path).iterdir():
        (tmp_path / item.name).symlink_to(item)
    (tmp_path / "config.json").unlink()
    config = (Path(path) / "config.json").read_text().replace('"FalconForCausalLM"',
                                                               '"NoSuchForCausalLM"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=r"NoSuchForCausalLM.*not supported; supported: "
                                         r".*CohereForCausalLM.*ExaoneForCausalLM.*"
                                         r"FalconForCausalLM.*GPTJForCausalLM.*"
                                         r"InternLM2ForCausalLM.*Olmo2ForCausalLM.*"
                                         r"OlmoForCausalLM"):
        LLM(model=str(tmp_path), dtype="float32")


def test_quantization_refusal_lists_the_quantizable_architectures():
    """A class without quantization support (StarCoder2 here) names the ones that have it."""
    from pagedllm.entrypoints.llm import LLM
    from tests.models.test_dense_models_new import _configs as other_configs
    path = build_tiny_checkpoint("starcoder2", other_configs()["starcoder2"])
    with pytest.raises(ValueError, match=r"Starcoder2ForCausalLM does not support --quantization"
                                         r" fp8 yet; quantized checkpoints load for .*"
                                         r"CohereForCausalLM.*ExaoneForCausalLM.*"
                                         r"FalconForCausalLM.*GPTJForCausalLM.*"
                                         r"InternLM2ForCausalLM.*LlamaForCausalLM.*"
                                         r"Olmo2ForCausalLM.*OlmoForCausalLM"):
        LLM(model=str(path), dtype="float32", quantization="fp8")


class _ReferenceModel:
    """The InternLM2 reference behind HF's call interface (``model(ids).logits``)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def __call__(self, ids: torch.Tensor):
        from types import SimpleNamespace
        return SimpleNamespace(logits=reference_forward(self.state, ids[0].tolist())[None])


def _cuda_bf16_oracle(arch: str, path: str):
    if arch == "internlm2":
        from safetensors.torch import load_file
        return _ReferenceModel({k: v.to("cuda", torch.bfloat16) for k, v in
                                load_file(f"{path}/model.safetensors").items()})
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                attn_implementation="eager").cuda().eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_arch", ARCHITECTURES)
def test_cuda_bf16_matches_oracle_teacher_forced(gpu_arch, monkeypatch):
    """The CUDA path (Triton attention, CUDA graphs, GEMV at batch 1) in bf16 against the
    oracle in bf16 on the same GPU, by the rule of ``tests/e2e/test_gpu_bf16.py``: each of
    our greedy tokens is the oracle's argmax within 0.1 and its logprob within 0.1."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.layers import fused
    from tests.e2e.test_gpu_bf16 import _check_against_hf
    from tests.e2e.test_gpu_bf16 import _prompts as gpu_prompts
    monkeypatch.setattr(fused, "_GEMV", "all")  # the tiny shapes are not tuned ones
    path = _build(gpu_arch)
    oracle = _cuda_bf16_oracle(gpu_arch, path)
    flags = {"trust_remote_code": True} if gpu_arch in REMOTE_CODE else {}
    llm = LLM(model=path, dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3,
              **flags)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    prompts = gpu_prompts()
    for batch in ([prompts[0]], prompts):  # one row: GEMV path; three rows: cuBLAS
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
        for i, out in enumerate(outs):
            tokens = list(out.outputs[0].token_ids)
            lps = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens)]
            _check_against_hf(oracle, batch[i], tokens, lps,
                              f"{gpu_arch} batch {len(batch)} row {i}")


def test_exaone_hub_names_and_remote_config_attributes_load():
    """The hub's remote-code config spells ``num_layers`` / ``layer_norm_epsilon`` /
    ``activation_function``; with those names (and no Llama ones) the model builds, loads
    the hub's ``transformer.h.*`` tensors and gives HF's log-probabilities."""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from pagedllm.models.registry import resolve_model_class
    path = _build("exaone")
    hf, _ = _hf_state("exaone")  # seeded: the weights the checkpoint was saved with
    config = {k: v for k, v in hf.config.to_dict().items()
              if k not in ("rms_norm_eps", "hidden_act", "num_hidden_layers")}
    # the remote config maps num_hidden_layers onto num_layers (attribute_map)
    config.update(layer_norm_epsilon=hf.config.rms_norm_eps,
                  activation_function=hf.config.hidden_act, num_layers=2, num_hidden_layers=2)
    remote = SimpleNamespace(**config)
    model = resolve_model_class(["ExaoneForCausalLM"])(remote, 512)
    state = load_file(f"{path}/model.safetensors")
    assert any(name.startswith("transformer.h.0.attn.attention.") for name in state)
    assert model.load_weights(state.items()) == set(dict(model.named_parameters()))
    prompts = _prompts()
    ours = _prefill_logprobs(model, remote, prompts)
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
            torch.testing.assert_close(ours[i], theirs, atol=1e-4, rtol=0)
