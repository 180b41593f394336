"""Engine configuration: defaults, statuses, validation and derived values (no weights needed)."""

import dataclasses
import json
import logging

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig

from pagedllm import arg_utils, config
from pagedllm.arg_utils import EngineArgs
from pagedllm.config import (DEFAULT_ONLY, EngineConfig, engine_option_fields, field_default,
                             flag_name)
from pagedllm.models.hf_config import resolve_torch_dtype

# vLLM 0.6.3 EngineArgs / AsyncEngineArgs defaults (enforce_eager: the CLI's False).
VLLM_DEFAULTS = {
    "model": "facebook/opt-125m", "served_model_name": None, "tokenizer": None,
    "skip_tokenizer_init": False, "tokenizer_mode": "auto", "trust_remote_code": False,
    "download_dir": None, "load_format": "auto", "config_format": "auto", "dtype": "auto",
    "kv_cache_dtype": "auto", "quantization_param_path": None, "seed": 0, "max_model_len": None,
    "worker_use_ray": False, "distributed_executor_backend": None, "pipeline_parallel_size": 1,
    "tensor_parallel_size": 1, "max_parallel_loading_workers": None, "block_size": 16,
    "enable_prefix_caching": False, "disable_sliding_window": False,
    "use_v2_block_manager": True, "swap_space": 4, "cpu_offload_gb": 0,
    "gpu_memory_utilization": 0.9, "max_num_batched_tokens": None, "max_num_seqs": 256,
    "max_logprobs": 20, "disable_log_stats": False, "revision": None, "code_revision": None,
    "rope_scaling": None, "rope_theta": None, "tokenizer_revision": None, "quantization": None,
    "enforce_eager": False, "max_context_len_to_capture": None, "max_seq_len_to_capture": 8192,
    "disable_custom_all_reduce": False, "tokenizer_pool_size": 0, "tokenizer_pool_type": "ray",
    "tokenizer_pool_extra_config": None, "limit_mm_per_prompt": None,
    "mm_processor_kwargs": None, "enable_lora": False, "max_loras": 1, "max_lora_rank": 16,
    "enable_prompt_adapter": False, "max_prompt_adapters": 1, "max_prompt_adapter_token": 0,
    "fully_sharded_loras": False, "lora_extra_vocab_size": 256,
    "long_lora_scaling_factors": None, "lora_dtype": "auto", "max_cpu_loras": None,
    "device": "auto", "num_scheduler_steps": 1, "multi_step_stream_outputs": True,
    "ray_workers_use_nsight": False, "num_gpu_blocks_override": None, "num_lookahead_slots": 0,
    "model_loader_extra_config": None, "ignore_patterns": None, "preemption_mode": None,
    "scheduler_delay_factor": 0.0, "enable_chunked_prefill": None,
    "guided_decoding_backend": "outlines", "speculative_model": None,
    "speculative_model_quantization": None, "speculative_draft_tensor_parallel_size": None,
    "num_speculative_tokens": None, "speculative_disable_mqa_scorer": False,
    "speculative_max_model_len": None, "speculative_disable_by_batch_size": None,
    "ngram_prompt_lookup_max": None, "ngram_prompt_lookup_min": None,
    "spec_decoding_acceptance_method": "rejection_sampler",
    "typical_acceptance_sampler_posterior_threshold": None,
    "typical_acceptance_sampler_posterior_alpha": None, "qlora_adapter_name_or_path": None,
    "disable_logprobs_during_spec_decoding": None, "otlp_traces_endpoint": None,
    "collect_detailed_traces": None, "disable_async_output_proc": False,
    "override_neuron_config": None, "scheduling_policy": "fcfs", "disable_log_requests": False,
}


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setattr(config, "cuda_backend_available", lambda: False)
    monkeypatch.setattr(arg_utils, "cuda_backend_available", lambda: False)


def _llama_dir(tmp_path, **overrides):
    kwargs = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                  max_position_embeddings=256, architectures=["LlamaForCausalLM"])
    kwargs.update(overrides)
    LlamaConfig(**kwargs).save_pretrained(tmp_path)
    return str(tmp_path)


def _write_config(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def _engine(model, **kwargs) -> EngineConfig:
    return EngineArgs(model=model, **kwargs).create_engine_config()


def test_defaults_equal_vllm():
    assert EngineArgs().to_dict() == VLLM_DEFAULTS
    assert EngineArgs("x").model == "x"  # model is the first positional, as in vLLM


def test_unknown_argument_is_named():
    with pytest.raises(TypeError, match="blok_size.*did you mean 'block_size'"):
        EngineArgs(blok_size=8)
    with pytest.raises(ValueError, match="blok_size"):
        EngineArgs(blok_size=8)


def _unsupported_values(f):
    """Values of one field that the status says are not built yet."""
    md, default = f.metadata, field_default(f)
    if f.name == "disable_logprobs_during_spec_decoding":
        return [False]  # None (the default) and True are built
    if md["supported"] != DEFAULT_ONLY:
        candidates = list(md.get("choices") or ()) + [2, 1.5, "x"]
        supported = md["supported"]
        check = supported if callable(supported) else (lambda v: v in supported)
        valid = md.get("valid")
        return [v for v in candidates
                if (v in md["choices"] if md.get("choices") else
                    type(v) is type(default) or (default is None and isinstance(v, str)))
                and (not valid or valid[0](v)) and not check(v)]
    if isinstance(default, bool):
        return [True]
    if md.get("choices"):
        return [next(c for c in md["choices"] if c != default)]
    if md.get("cli_type") in ("json", "kv_int"):
        return [{"image": 2}]
    if isinstance(default, int):
        return [default + 1]
    if f.name.endswith(("threshold", "alpha")):
        return [0.5]
    if "size" in f.name or "len" in f.name or f.name.startswith(("num_", "ngram", "max_")):
        return [3]
    return ["x"]


NOT_BUILT = [f for f in engine_option_fields() if f.metadata.get("supported") is not None]


@pytest.mark.parametrize("f", NOT_BUILT, ids=[f.name for f in NOT_BUILT])
def test_not_built_flags_fail_at_startup_naming_the_flag(f):
    values = _unsupported_values(f)
    assert values, f"no unsupported sample value for {f.name}"
    for value in values:
        # The status check runs before the model is resolved: a missing model is never reached.
        with pytest.raises(ValueError) as info:
            _engine("/nonexistent/model", **{f.name: value})
        message = str(info.value)
        assert flag_name(f.name) in message and "not supported yet" in message
        if not isinstance(value, (bool, dict)):
            assert str(value) in message


def test_partial_statuses(tmp_path):
    model = _llama_dir(tmp_path)
    for kwargs in (dict(device="cpu"), dict(load_format="dummy"), dict(config_format="hf"),
                   dict(tokenizer_mode="slow"), dict(preemption_mode="swap"),
                   dict(scheduling_policy="priority"), dict(use_v2_block_manager=False)):
        _engine(model, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda .*no CUDA device.*supported: auto"):
            _engine(model, device="cuda")
    with pytest.raises(ValueError, match="--cpu-offload-gb 2 streams weights .*--device cpu"):
        _engine(model, cpu_offload_gb=2, device="cpu")


@pytest.mark.parametrize("kwargs, flag", [
    (dict(block_size=7), "--block-size 7"), (dict(gpu_memory_utilization=0.0), "--gpu-memory"),
    (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
    (dict(swap_space=-1), "--swap-space"), (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(dtype="int8"), "--dtype"), (dict(preemption_mode="drop"), "--preemption-mode"),
])
def test_invalid_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        _engine("/nonexistent/model", **kwargs)


def test_resolved_engine_config(tmp_path):
    cfg = _engine(_llama_dir(tmp_path))
    m = cfg.model
    assert (m.model_path, m.tokenizer_path) == (str(tmp_path.resolve()),) * 2
    assert m.model == str(tmp_path)  # user-facing value kept
    assert (m.architecture, m.num_hidden_layers, m.hidden_size) == ("LlamaForCausalLM", 2, 64)
    assert (m.num_attention_heads, m.num_kv_heads, m.head_dim, m.vocab_size) == (4, 2, 16, 100)
    assert m.max_model_len == 256 and m.max_seq_len_to_capture == 256
    assert m.sliding_window is None and m.served_model_names == [str(tmp_path)]
    assert m.get_max_logprobs() == 20 and m.torch_dtype == torch.float32
    assert cfg.device.device == "cpu" and cfg.scheduler.preemption_mode == "recompute"
    assert cfg.load.ignore_patterns == ["original/**/*"]
    assert cfg.parallel.world_size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache.block_size = 8


def test_skip_tokenizer_init_and_served_names(tmp_path):
    m = _engine(_llama_dir(tmp_path), skip_tokenizer_init=True,
                served_model_name=["a", "b"]).model
    assert m.tokenizer_path is None and m.served_model_names == ["a", "b"]


def test_max_num_batched_tokens_defaults(tmp_path):
    model = _llama_dir(tmp_path, max_position_embeddings=4096)
    assert _engine(model).scheduler.max_num_batched_tokens == 4096
    assert _engine(model, max_model_len=1024).scheduler.max_num_batched_tokens == 2048
    sched = _engine(model, enable_chunked_prefill=True).scheduler
    assert (sched.max_num_batched_tokens, sched.enable_chunked_prefill) == (512, True)
    assert _engine(model).scheduler.enable_chunked_prefill is False  # CPU default
    assert _engine(model, enable_chunked_prefill=True,
                   max_num_batched_tokens=64, max_num_seqs=8).scheduler.max_num_batched_tokens == 64
    with pytest.raises(ValueError, match="--max-num-batched-tokens 1000 is smaller than "
                                         "--max-model-len 4096"):
        _engine(model, max_num_batched_tokens=1000)
    with pytest.raises(ValueError, match="--max-num-batched-tokens 100 must be >= --max-num-seqs"):
        _engine(model, enable_chunked_prefill=True, max_num_batched_tokens=100)


def test_dtype_resolution(tmp_path):
    model = _llama_dir(tmp_path, dtype="bfloat16")
    assert _engine(model).model.torch_dtype == torch.float32  # auto on CPU
    assert _engine(model, dtype="half").model.torch_dtype == torch.float16
    assert _engine(model, dtype="bfloat16").model.torch_dtype == torch.bfloat16
    assert _engine(model, dtype="float").model.torch_dtype == torch.float32
    hf = _engine(model).model.hf_config
    assert resolve_torch_dtype("auto", hf, "cuda") == torch.bfloat16  # checkpoint dtype
    hf32 = LlamaConfig(dtype="float32")
    assert resolve_torch_dtype("auto", hf32, "cuda") == torch.float16  # fp32 -> fp16 (vLLM)


def test_max_model_len_derivation(tmp_path):
    model = _llama_dir(tmp_path / "a")
    assert _engine(model, max_model_len=100).model.max_model_len == 100
    with pytest.raises(ValueError, match=r"--max-model-len 300 is larger .*\(256"):
        _engine(model, max_model_len=300)
    scaled = _engine(model, max_model_len=512, rope_scaling={"type": "linear", "factor": 2.0})
    assert scaled.model.max_model_len == 512
    assert _engine(model, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor":
                   1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
                   ).model.max_model_len == 256  # llama3 does not extend the context
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert _engine(model, rope_scaling=yarn).model.max_model_len == 512
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(gpt2)
    assert _engine(str(gpt2)).model.max_model_len == 64


def test_sliding_window(tmp_path):
    MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=1024,
                  sliding_window=128).save_pretrained(tmp_path)
    assert _engine(str(tmp_path)).model.sliding_window == 128
    capped = _engine(str(tmp_path), disable_sliding_window=True).model
    assert (capped.sliding_window, capped.max_model_len) == (None, 128)


def test_rope_override_transformers5_config(tmp_path):
    model = _llama_dir(tmp_path)  # save_pretrained writes rope_parameters
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    hf = _engine(model, rope_theta=123.0,
                 rope_scaling={"type": "dynamic", "factor": 2.0}).model.hf_config
    assert hf.rope_parameters == {"rope_theta": 123.0, "rope_type": "dynamic", "factor": 2.0}
    only_theta = _engine(model, rope_theta=5.0).model.hf_config.rope_parameters
    assert only_theta == {"rope_theta": 5.0, "rope_type": "default"}


def test_rope_override_transformers4_config(tmp_path):
    model = _write_config(tmp_path, {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 256,
        "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16"})
    m = _engine(model).model  # old keys are converted on load
    assert m.hf_config.rope_parameters["rope_theta"] == 500000.0
    assert m.hf_config.rope_parameters["rope_type"] == "linear"
    assert m.max_model_len == 512
    assert resolve_torch_dtype("auto", m.hf_config, "cuda") == torch.bfloat16
    hf = _engine(model, rope_theta=1000.0,
                 rope_scaling={"rope_type": "linear", "factor": 4.0}).model.hf_config
    assert hf.rope_parameters == {"rope_theta": 1000.0, "rope_type": "linear", "factor": 4.0}


def test_model_without_rope_rejects_rope_flags(tmp_path):
    OPTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, ffn_dim=64,
              word_embed_proj_dim=32, max_position_embeddings=128).save_pretrained(tmp_path)
    m = _engine(str(tmp_path)).model
    assert (m.num_kv_heads, m.head_dim, m.max_model_len) == (2, 16, 128)
    with pytest.raises(ValueError, match="--rope-theta"):
        _engine(str(tmp_path), rope_theta=10.0)


def test_remote_code_needs_trust(tmp_path):
    (tmp_path / "a").mkdir()
    model = _write_config(tmp_path / "a", {"model_type": "llama", "auto_map": {
        "AutoConfig": "configuration_x.XConfig"}})
    with pytest.raises(ValueError, match="--trust-remote-code"):
        _engine(model)
    (tmp_path / "b").mkdir()
    unknown = _write_config(tmp_path / "b", {"model_type": "no_such_model_type"})
    with pytest.raises(ValueError, match="no_such_model_type.*--trust-remote-code"):
        _engine(unknown)


def test_unbuilt_quantized_checkpoint_is_rejected(tmp_path):
    """Quantization methods that are not built yet fail at start-up naming the method."""
    model = _llama_dir(tmp_path, quantization_config={"quant_method": "aqlm",
                                                      "in_group_size": 8})
    with pytest.raises(ValueError, match="quant_method 'aqlm' is not supported"):
        _engine(model)


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        _engine(str(tmp_path))


def _offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_repo_id_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(ValueError) as info:
        _engine("facebook/opt-125m", download_dir=str(tmp_path))
    message = str(info.value)
    assert "--model 'facebook/opt-125m' was not found locally" in message
    assert "network is unavailable" in message and "local model directory" in message
    with pytest.raises(ValueError, match="no such directory"):
        _engine("/nonexistent/model/dir")


def test_repo_id_resolves_from_hf_cache_offline(tmp_path, monkeypatch):
    _offline(monkeypatch)
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    _llama_dir(snapshot)
    (snapshot / "model.safetensors").write_bytes(b"")
    cfg = _engine("org/tiny", download_dir=str(tmp_path))
    assert cfg.model.model_path == str(snapshot) and cfg.model.served_model_names == ["org/tiny"]
    with pytest.raises(ValueError, match="not found locally"):  # weights missing from the cache
        (snapshot / "model.safetensors").unlink()
        _engine("org/tiny", download_dir=str(tmp_path))
    assert _engine("org/tiny", download_dir=str(tmp_path), load_format="dummy").model.model_path


def test_deprecated_alias_warns_once_and_maps(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pagedllm"):
        m = _engine(_llama_dir(tmp_path), max_context_len_to_capture=64).model
    assert m.max_seq_len_to_capture == 64
    warnings = [r for r in caplog.records if "--max-context-len-to-capture" in r.getMessage()]
    assert len(warnings) == 1 and "--max-seq-len-to-capture" in warnings[0].getMessage()


def test_engine_config_groups():
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    assert names == ["model", "cache", "load", "scheduler", "parallel", "device", "lora",
                     "prompt_adapter", "speculative", "decoding", "observability",
                     "tokenizer_pool", "multimodal"]
    for f in engine_option_fields():
        assert f.metadata["help"], f.name
