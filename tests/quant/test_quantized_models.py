"""Quantized checkpoints through the whole engine against Hugging Face transformers.

Checkpoints: tiny random models quantized by the packers of ``packers.py`` (published GPTQ /
AWQ / fp8 layouts). Oracle: an fp32 HF model holding the dequantized weights (the codes times
their scales, computed from the integer codes, not from the packed words); for fp8 with
activation quantization, forward pre-hooks on HF's quantized ``nn.Linear`` layers round their
inputs through fp8 the same way (static scale, or max |x| / 448). Greedy tokens must be equal.
"""
from __future__ import annotations

import pytest
import torch

from tests.quant.checkpoints import hf_greedy, hf_oracle, quantized_checkpoint
from tests.utils.tiny_models import VOCAB_SIZE

MAX_TOKENS = 12


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(77)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in (5, 17, 30)]


def _engine_greedy(path, one_at_a_time: bool = False, **flags) -> list[list[int]]:
    """Greedy tokens of the prompts, batched; ``one_at_a_time`` for dynamic per-tensor
    activation scales, which depend on the whole batch (as in vLLM) while HF runs each
    prompt alone."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=str(path), dtype="float32", block_size=8, **flags)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    batches = [[p] for p in _prompts()] if one_at_a_time else [_prompts()]
    return [list(o.outputs[0].token_ids) for batch in batches
            for o in llm.generate(prompt_token_ids=batch, sampling_params=params,
                                  use_tqdm=False)]


GPTQ_CASES = {
    "llama-4bit-g32-sym": ("llama", dict(bits=4, group_size=32)),
    "llama-8bit-per-column": ("llama", dict(bits=8, group_size=-1)),
    "llama-4bit-desc-act-asym": ("llama", dict(bits=4, group_size=32, desc_act=True, sym=False)),
    "qwen2-4bit-desc-act": ("qwen2", dict(bits=4, group_size=16, desc_act=True)),
    "gpt2-4bit-conv1d": ("gpt2", dict(bits=4, group_size=32)),
    "opt-4bit-gptq-v2-asym": ("opt", dict(bits=4, group_size=32, sym=False, v2=True)),
}


def _gptq_config(options: dict) -> dict:
    config = {"quant_method": "gptq", "bits": options["bits"],
              "group_size": options["group_size"], "desc_act": options.get("desc_act", False),
              "sym": options.get("sym", True)}
    if options.get("v2"):
        config["checkpoint_format"] = "gptq_v2"
    return config


@pytest.mark.parametrize("case", sorted(GPTQ_CASES))
def test_gptq_greedy_matches_hf_on_dequantized_weights(case, tmp_path):
    arch, options = GPTQ_CASES[case]
    path, oracle = quantized_checkpoint(arch, "gptq", tmp_path / case, _gptq_config(options),
                                        options)
    assert _engine_greedy(path) == hf_greedy(hf_oracle(arch, oracle), _prompts(), MAX_TOKENS)


AWQ_CASES = {
    "llama-g32": ("llama", 32, ()),
    "phi3-fused-checkpoint-g16": ("phi3", 16, ()),
    "qwen2-down-proj-not-converted": ("qwen2", 32, ("down_proj",)),
}


@pytest.mark.parametrize("case", sorted(AWQ_CASES))
def test_awq_greedy_matches_hf_on_dequantized_weights(case, tmp_path):
    arch, group, skip = AWQ_CASES[case]
    config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": list(skip) or None}
    path, oracle = quantized_checkpoint(arch, "awq", tmp_path / case, config,
                                        {"group_size": group}, skip=skip)
    assert _engine_greedy(path) == hf_greedy(hf_oracle(arch, oracle), _prompts(), MAX_TOKENS)


@pytest.mark.parametrize("marlin_name", ["gptq_marlin", "marlin"])
def test_marlin_names_load_gptq_checkpoints(marlin_name, tmp_path, caplog):
    options = dict(bits=4, group_size=32)
    path, oracle = quantized_checkpoint("llama", "gptq", tmp_path / "m", _gptq_config(options),
                                        options)
    with caplog.at_level("INFO", logger="pagedllm.quant.config"):
        tokens = _engine_greedy(path, quantization=marlin_name)
    assert tokens == hf_greedy(hf_oracle("llama", oracle), _prompts(), MAX_TOKENS)
    assert f"--quantization {marlin_name} -> gptq 4-bit" in caplog.text


def _fake_quant_hooks(model, modules: list[str], scales: dict[str, float] | None):
    """Round each quantized HF linear layer's input through fp8 (static or dynamic scale)."""
    def hook_for(scale):
        def hook(_module, args):
            x = args[0]
            s = torch.tensor(scale) if scale is not None else x.abs().max() / 448.0
            q = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            return (q.float() * s,) + args[1:]
        return hook
    for name in modules:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(hook_for(None if scales is None else scales[name]))


@pytest.mark.parametrize("scheme", ["static", "dynamic"])
def test_fp8_checkpoint_greedy_matches_hf(scheme, tmp_path):
    from tests.quant.checkpoints import quantized_modules
    static = 0.02 if scheme == "static" else None
    config = {"quant_method": "fp8", "activation_scheme": scheme, "ignored_layers": None}
    path, oracle = quantized_checkpoint("llama", "fp8", tmp_path / scheme, config,
                                        {"input_scale": static})
    hf = hf_oracle("llama", oracle)
    modules = quantized_modules("llama", oracle)
    _fake_quant_hooks(hf, modules, {m: static for m in modules} if static else None)
    tokens = _engine_greedy(path, one_at_a_time=scheme == "dynamic")
    assert tokens == hf_greedy(hf, _prompts(), MAX_TOKENS)


def test_fp8_quantizes_an_unquantized_checkpoint_at_load():
    """--quantization fp8 on a float checkpoint: one scale per (fused) layer, dynamic
    activation scales; the oracle fuses q/k/v and gate/up the same way."""
    from safetensors.torch import load_file

    from tests.quant.checkpoints import quantized_modules
    from tests.utils.tiny_models import build_tiny_model
    path = build_tiny_model("llama")
    state = load_file(str(path / "model.safetensors"))
    modules = quantized_modules("llama", state)
    fused = {}
    for m in modules:
        leaf = m.rsplit(".", 1)[1]
        key = m.replace(leaf, {"k_proj": "q_proj", "v_proj": "q_proj",
                               "up_proj": "gate_proj"}.get(leaf, leaf))
        fused.setdefault(key, []).append(m)
    oracle = dict(state)
    for members in fused.values():
        scale = max(state[m + ".weight"].abs().max() for m in members) / 448.0
        for m in members:
            q = (state[m + ".weight"] / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            oracle[m + ".weight"] = q.float() * scale
    hf = hf_oracle("llama", oracle)
    _fake_quant_hooks(hf, modules, None)
    tokens = _engine_greedy(path, one_at_a_time=True, quantization="fp8")
    assert tokens == hf_greedy(hf, _prompts(), MAX_TOKENS)
