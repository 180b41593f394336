"""Config seams (issue 21 item 1): cross-field checks that need the architecture run in
``create_engine_config``, before any weight is read; derived values are computed once, on the
``EngineConfig``. Oracles: a model directory that holds only ``config.json`` (no weights: a
check that needed loading could not run), the flags' documented meaning, and the values the
components used to compute themselves."""
import pytest
from transformers import LlamaConfig, OPTConfig

from pagedllm import arg_utils, config
from pagedllm.arg_utils import EngineArgs
from pagedllm.core.spec_propose import SpecSettings


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setattr(config, "cuda_backend_available", lambda: False)
    monkeypatch.setattr(arg_utils, "cuda_backend_available", lambda: False)


def _config_only(tmp_path, config_cls, **kwargs) -> str:
    config_cls(**kwargs).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # nothing to load
    return str(tmp_path)


def _opt(tmp_path) -> str:
    return _config_only(tmp_path, OPTConfig, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                        num_hidden_layers=2, vocab_size=100, word_embed_proj_dim=32,
                        max_position_embeddings=128, architectures=["OPTForCausalLM"])


def _llama(tmp_path, **overrides) -> str:
    kwargs = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                  max_position_embeddings=256, architectures=["LlamaForCausalLM"])
    return _config_only(tmp_path, LlamaConfig, **(kwargs | overrides))


def test_lora_support_fails_before_any_weight_loads(tmp_path, monkeypatch):
    from pagedllm.models import loader

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")
    monkeypatch.setattr(loader, "load_model", no_load)
    with pytest.raises(ValueError, match="--enable-lora: OPTForCausalLM is not supported"):
        EngineArgs(model=_opt(tmp_path), enable_lora=True).create_engine_config()


def test_lora_on_a_supported_architecture_passes_the_check(tmp_path):
    engine_config = EngineArgs(model=_llama(tmp_path), enable_lora=True).create_engine_config()
    assert engine_config.lora.enable_lora


def test_prompt_adapter_support_fails_before_any_weight_loads(tmp_path):
    with pytest.raises(ValueError, match="OPTForCausalLM does not support prompt adapters"):
        EngineArgs(model=_opt(tmp_path), enable_prompt_adapter=True,
                   max_prompt_adapter_token=8).create_engine_config()


def test_derived_values_are_computed_once_on_the_config(tmp_path, monkeypatch):
    engine_config = EngineArgs(
        model=_llama(tmp_path, num_key_value_heads=2), speculative_model="[ngram]",
        num_speculative_tokens=3, ngram_prompt_lookup_max=4,
        spec_decoding_acceptance_method="typical_acceptance_sampler",
        otlp_traces_endpoint="http://localhost:4318", collect_detailed_traces="model",
    ).create_engine_config()
    assert engine_config.spec == SpecSettings(3, 4, typical=(0.09, 0.3))
    assert engine_config.spec is engine_config.spec  # cached: one instance
    assert engine_config.detailed_traces == (True, False)
    assert engine_config.kv_heads_per_rank == 2
    monkeypatch.setenv("PAGEDLLM_ASYNC_OUTPUT_PROC", "1")
    assert engine_config.async_output_proc  # on when asked for, on CPU too
    assert not engine_config.lookahead  # speculative decoding: one batch in flight
    monkeypatch.delenv("PAGEDLLM_ASYNC_OUTPUT_PROC")
    assert engine_config.async_output_proc  # decided once: the switch is read at first use


def test_kv_heads_per_rank_replicates_when_tp_exceeds_them(tmp_path):
    import dataclasses
    engine_config = EngineArgs(model=_llama(tmp_path)).create_engine_config()
    for tp, want in ((1, 2), (2, 1), (4, 1)):
        parallel = dataclasses.replace(engine_config.parallel, tensor_parallel_size=tp)
        assert dataclasses.replace(engine_config, parallel=parallel).kv_heads_per_rank == want


def test_importing_the_option_handling_loads_no_transformers():
    """transformers (and huggingface_hub) are the slowest imports of start-up (issue 19): the
    option modules import them only inside the functions that load a Hugging Face config or
    download a snapshot. Oracle: a fresh interpreter's ``sys.modules``."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, pagedllm.config, pagedllm.arg_utils, pagedllm.models.resolve\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & "
            "{'transformers', 'huggingface_hub'}))\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, check=True)
    assert out.stdout.strip() == "[]"
