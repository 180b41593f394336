"""Methods that are not built, flags that contradict the checkpoint and bad quantized
checkpoints fail at start-up with a ValueError naming the flag, the config key or the tensor.

Method checks run in ``create_engine_config`` (no weights read); checkpoint defects surface
while loading, before the engine serves anything.
"""
from __future__ import annotations

import pytest

from pagedllm.config import QUANTIZATION_METHODS
from pagedllm.quant.config import SUPPORTED
from tests.quant.checkpoints import quantized_checkpoint
from tests.utils.tiny_models import build_tiny_model

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


def _config(model, **flags):
    from pagedllm.arg_utils import EngineArgs
    return EngineArgs(model=str(model), dtype="float32", **flags).create_engine_config()


def _llm(model, **flags):
    from pagedllm.entrypoints.llm import LLM
    return LLM(model=str(model), dtype="float32", **flags)


@pytest.mark.parametrize("method", [m for m in QUANTIZATION_METHODS if m not in SUPPORTED])
def test_unbuilt_flag_fails_naming_it_and_listing_the_supported(method):
    with pytest.raises(ValueError, match=f"--quantization {method} .*supported: .*gptq.*awq.*fp8"):
        _config(build_tiny_model("llama"), quantization=method)


@pytest.mark.parametrize("method", ["gguf", "aqlm", "marlin", "qqq"])
def test_unbuilt_checkpoint_method_fails_naming_quant_method(method, tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", {"quant_method": method},
                                   dict(bits=4, group_size=32))
    with pytest.raises(ValueError, match=f"quant_method '{method}'.*--quantization"):
        _config(path)


def test_flag_contradicting_the_checkpoint(tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", GPTQ,
                                   dict(bits=4, group_size=32))
    with pytest.raises(ValueError, match="--quantization awq does not match .* gptq checkpoint"):
        _config(path, quantization="awq")
    assert _config(path, quantization="gptq_marlin").model.quant_config.name == "gptq"


def test_weight_only_flag_needs_a_quantized_checkpoint():
    with pytest.raises(ValueError, match="--quantization gptq needs a gptq checkpoint"):
        _config(build_tiny_model("llama"), quantization="gptq")


@pytest.mark.parametrize("config,match", [
    (dict(GPTQ, bits=3), "bits=3 .*supported: 2, 4, 8"),
    (dict(GPTQ, lm_head=True), "quantized LM head"),
    (dict(GPTQ, checkpoint_format="marlin"), "Marlin layout"),
    (dict(GPTQ, checkpoint_format="marlin_24"), "2:4 sparse Marlin layout .*gptq_marlin_24"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "weight_block_size"),
])
def test_unsupported_config_keys(config, match, tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", config,
                                   dict(bits=4, group_size=32))
    with pytest.raises(ValueError, match=match):
        _config(path)


def _drop(*names):
    def edit(state):
        for name in names:
            del state[name]
    return edit


def test_missing_scales_of_one_fused_part_names_it(tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", GPTQ,
                                   dict(bits=4, group_size=32),
                                   edit=_drop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.qkv_proj.scales \(part 'k'\)"):
        _llm(path)


def test_missing_scales_names_the_tensor(tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", GPTQ,
                                   dict(bits=4, group_size=32),
                                   edit=_drop("model.layers.0.mlp.down_proj.scales"))
    with pytest.raises(ValueError, match="weights missing.*model.layers.0.mlp.down_proj.scales"):
        _llm(path)


def test_wrong_group_size_names_the_tensor(tmp_path):
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", GPTQ,  # says 32
                                   dict(bits=4, group_size=16))
    # a group of 16 doubles the groups: the first grouped tensor read is the one named
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model\.layers\.0\.[a-z_.]+\."
                                         r"(qzeros|scales)' has shape \((4|8), "):
        _llm(path)


def test_fp8_missing_weight_scale_names_the_layer(tmp_path):
    config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    path, _ = quantized_checkpoint("llama", "fp8", tmp_path / "m", config, {},
                                   edit=_drop("model.layers.0.self_attn.v_proj.weight_scale"))
    with pytest.raises(ValueError, match=r"qkv_proj.weight_scale \(part 'v'\)"):
        _llm(path)


def test_desc_act_g_idx_must_agree_across_fused_parts(tmp_path):
    def edit(state):
        g = state["model.layers.0.self_attn.k_proj.g_idx"]
        state["model.layers.0.self_attn.k_proj.g_idx"] = g.flip(0).contiguous()
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", dict(GPTQ, desc_act=True),
                                   dict(bits=4, group_size=32), edit=edit)
    with pytest.raises(ValueError, match=r"self_attn\.[qk]_proj\.g_idx' differs from "
                                         r"'.*self_attn\.[qk]_proj\.g_idx'"):
        _llm(path)


def test_fused_module_skipped_only_in_part(tmp_path):
    config = dict(GPTQ, modules_to_not_convert=["q_proj"])
    path, _ = quantized_checkpoint("llama", "gptq", tmp_path / "m", config,
                                   dict(bits=4, group_size=32), skip=("q_proj",))
    with pytest.raises(ValueError, match="skip only some of .*qkv_proj"):
        _llm(path)
