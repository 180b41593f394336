"""fbgemm_fp8 and modelopt fp8 checkpoints against an fp32 HF model (no library here writes
them on CPU: transformers' FbgemmFp8 quantizer needs fbgemm-gpu kernels and ModelOpt needs
CUDA, so the packer of ``packers.py`` follows their published layouts).

Oracle: an fp32 HF model holding the dequantized weights (fp8 value x scale), with forward
pre-hooks rounding each quantized layer's input through fp8 as the format does: per token with
scale min(max|x_row|, activation_scale_ub) / 448 (fbgemm_fp8, vLLM's ``scaled_fp8_quant``), or
the checkpoint's static per-tensor ``input_scale`` (modelopt). Greedy tokens must be equal.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.quant.checkpoints import (
    hf_greedy,
    hf_oracle,
    quantized_checkpoint,
    quantized_modules,
)
from tests.quant.test_quantized_models import MAX_TOKENS, _engine_greedy, _prompts


def _hooks(model, modules: list[str], quantize) -> None:
    for name in modules:
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args: (quantize(args[0]),) + args[1:])


def _per_token(ub: float):
    def quantize(x):
        scale = (x.abs().amax(-1, keepdim=True).clamp(max=ub) / 448.0).clamp(
            min=1.0 / (448.0 * 512.0))
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return quantize


@pytest.mark.parametrize("ub", [1200.0, 1.0])
def test_fbgemm_fp8_greedy_matches_hf(ub, tmp_path):
    """ub 1200 (Meta's value) never binds here; ub 1.0 clamps most rows' scales, so values
    past 448 * scale saturate, in both."""
    skip = ("layers.1.mlp.down_proj",)
    config = {"quant_method": "fbgemm_fp8", "activation_scale_ub": ub,
              "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"]}
    path, oracle = quantized_checkpoint("llama", "fp8", tmp_path / "m", config,
                                        {"per_channel": True}, skip=skip)
    hf = hf_oracle("llama", oracle)
    _hooks(hf, quantized_modules("llama", oracle, skip), _per_token(ub))
    assert _engine_greedy(path) == hf_greedy(hf, _prompts(), MAX_TOKENS)


def _modelopt_checkpoint(tmp_path, static: float, in_config: bool):
    skip = ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj")

    def add_kv_scales(state):
        for layer in (0, 1):
            for proj, name in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
                state[f"model.layers.{layer}.self_attn.{proj}.{name}"] = torch.tensor(0.5)

    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
             "exclude_modules": ["lm_head", "model.layers.1.mlp*"]}
    path, oracle = quantized_checkpoint(
        "llama", "fp8", tmp_path / "m", {"quant_method": "modelopt", **quant},
        {"input_scale": static}, skip=skip, edit=add_kv_scales)
    if not in_config:  # the hf_quant_config.json beside config.json (ModelOpt's export)
        config = json.loads((path / "config.json").read_text())
        del config["quantization_config"]
        (path / "config.json").write_text(json.dumps(config))
        (path / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": quant}))
    return path, oracle, skip


@pytest.mark.parametrize("in_config", [False, True])
def test_modelopt_fp8_greedy_matches_hf(in_config, tmp_path, caplog):
    static = 0.02
    path, oracle, skip = _modelopt_checkpoint(tmp_path, static, in_config)
    hf = hf_oracle("llama", oracle)
    _hooks(hf, quantized_modules("llama", oracle, skip), lambda x: (
        (x / static).clamp(-448, 448).to(torch.float8_e4m3fn).float() * static))
    with caplog.at_level("WARNING"):
        tokens = _engine_greedy(path)
    assert tokens == hf_greedy(hf, _prompts(), MAX_TOKENS)
    assert "4 K/V cache scales of the checkpoint are not used" in caplog.text


def _config(model, **flags):
    from pagedllm.arg_utils import EngineArgs
    return EngineArgs(model=str(model), dtype="float32", **flags).create_engine_config()


def test_fp8_format_config_errors(tmp_path):
    path, _ = quantized_checkpoint("llama", "fp8", tmp_path / "a",
                                   {"quant_method": "fbgemm_fp8", "modules_to_not_convert": []},
                                   {"per_channel": True})
    with pytest.raises(ValueError, match="quantization_config.activation_scale_ub"):
        _config(path)
    path, _ = quantized_checkpoint("llama", "fp8", tmp_path / "b",
                                   {"quant_method": "modelopt", "quant_algo": "NVFP4"}, {})
    with pytest.raises(ValueError, match="modelopt quant_algo 'NVFP4' is not supported"):
        _config(path)
    path, _, _ = _modelopt_checkpoint(tmp_path / "c", 0.02, in_config=False)
    assert _config(path, quantization="modelopt").model.quant_config.name == "modelopt"
    with pytest.raises(ValueError, match="--quantization fp8 does not match .* a modelopt"):
        _config(path, quantization="fp8")
