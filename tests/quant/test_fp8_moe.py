"""``--quantization fp8`` on mixture-of-experts models (an unquantized checkpoint quantized at
load): the dense layers take fp8's W8A8 (one scale per fused layer, dynamic activation
scales), the routed experts e4m3 codes with a scale per row (activations unquantized).

Oracles, on the tiny Mixtral checkpoint of ``tests/models``:
1. Hugging Face (fp32) holding the dequantized weights, its quantized dense layers' inputs
   rounded through fp8 with the dynamic per-tensor scale (``test_quantized_models``' hooks),
   gives the same greedy tokens, one prompt at a time;
2. ``FusedMoE`` with the fp8 method equals the expert loop on the reference-dequantized rows
   bit for bit (CPU path), and its storage is e4m3 with fp32 row scales;
3. fp8 checkpoints of MoE models and the other methods are refused at start-up, naming what
   is supported.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.quant.test_quantized_models import (MAX_TOKENS, _engine_greedy, _fake_quant_hooks,
                                               _prompts)

_EXPERT = re.compile(r"\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)\.weight$")
_ATTN = re.compile(r"^(model\.layers\.\d+\.self_attn)\.([qkvo])_proj\.weight$")


def reference_fp8_rows(weight: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3: the row's max |w| maps to 448; dequantized back to fp32."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _oracle_copy(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """``src`` with every expert tensor reference-dequantized per row and q/k/v (one scale
    together) and o_proj per tensor; also the attention projections' module names."""
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, dst / item.name)
    state = load_file(str(src / "model.safetensors"))
    groups: dict[str, list[str]] = {}
    for name in state:
        if _EXPERT.search(name):
            state[name] = reference_fp8_rows(state[name]).contiguous()
        elif (match := _ATTN.match(name)) is not None:
            key = f"{match.group(1)}.{'o' if match.group(2) == 'o' else 'qkv'}"
            groups.setdefault(key, []).append(name)
    for members in groups.values():
        scale = max(state[m].abs().max() for m in members).float() / 448.0
        for m in members:
            q = (state[m].float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            state[m] = (q.float() * scale).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst, [m[:-len(".weight")] for members in groups.values() for m in members]


def test_mixtral_greedy_matches_hf_on_the_dequantized_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.models.test_moe_models import build_tiny_moe
    from tests.quant.checkpoints import hf_greedy
    src = build_tiny_moe("mixtral")
    oracle, modules = _oracle_copy(src, tmp_path / "oracle")
    hf = AutoModelForCausalLM.from_pretrained(str(oracle), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    _fake_quant_hooks(hf, modules, None)
    tokens = _engine_greedy(src, one_at_a_time=True, quantization="fp8")
    assert tokens == hf_greedy(hf, _prompts(), MAX_TOKENS)


def test_fused_moe_fp8_rows_equal_the_reference():
    from pagedllm.layers.activation import ActAndMul
    from pagedllm.layers.moe import FusedMoE, moe_reference, select_experts
    from pagedllm.quant.fp8 import Fp8Config
    torch.manual_seed(0)
    layer = FusedMoE(6, 40, 24, quant_config=Fp8Config(False, "dynamic"), prefix="m.experts")
    gate_up, down = torch.randn(6, 48, 40) / 7, torch.randn(6, 40, 24) / 5
    gate_up[2, 5] = 0.0  # an all-zero row stays zero
    layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up, "gu")
    layer.down_proj.weight_loader(layer.down_proj, down, "d")
    assert layer.quant_method.name == "fp8"
    assert layer.gate_up_proj.dtype == layer.down_proj.dtype == torch.float8_e4m3fn
    assert layer.gate_up_proj_scale.shape == (6, 48)
    assert layer.down_proj_scale.dtype == torch.float32
    x = torch.randn(5, 40)
    weights, ids = select_experts(torch.randn(5, 6), 2, renormalize=True)
    expected = moe_reference(x, reference_fp8_rows(gate_up), reference_fp8_rows(down), weights,
                             ids, ActAndMul("silu"))
    assert torch.equal(layer(x, weights, ids), expected)


def test_fp8_moe_refusals():
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.quant.awq import AWQConfig
    from pagedllm.quant.fp8 import Fp8Config
    from tests.models.test_deepseek_models import build_tiny_deepseek
    with pytest.raises(ValueError, match="fp8 checkpoints of mixture-of-experts models are "
                                         "not supported yet"):
        Fp8Config(True, "dynamic").moe_method_for("model.layers.0.mlp.experts")
    with pytest.raises(ValueError, match=r"--quantization awq does not cover "
                                         r"mixture-of-experts.*experts_int8, fp8"):
        AWQConfig(4, 128, True, "gemm").moe_method_for("model.layers.0.mlp.experts")
    with pytest.raises(ValueError, match="DeepseekV3ForCausalLM does not support "
                                         "--quantization fp8"):
        LLM(model=str(build_tiny_deepseek("deepseek_v3")), dtype="float32", quantization="fp8")
