"""Quantized tiny checkpoints and their oracles.

``quantized_checkpoint`` takes a tiny random checkpoint (``tests/utils/tiny_models``),
quantizes the decoder's linear layers with a packer of ``packers.py`` and writes a new model
directory with a ``quantization_config``; it also returns the oracle state dict: the original
checkpoint with each quantized weight replaced by its dequantized fp32 values, for an fp32 HF
model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.quant import packers
from tests.utils.tiny_models import build_tiny_model

# the checkpoint modules each architecture's quantizers touch (decoder linear layers)
MODULES = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"),
           "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"),
           "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
           "gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")}


def quantized_modules(arch: str, state: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """Checkpoint module names (without ``.weight``) to quantize."""
    names = []
    for key in state:
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        if module is None or ".layers." not in key and ".h." not in key:
            continue
        if any(module.endswith("." + m) for m in MODULES[arch]) and not any(
                module.endswith("." + s) for s in skip):
            names.append(module)
    return names


def _quantize(method: str, weight: torch.Tensor, options: dict):
    if method == "gptq":
        return packers.gptq_quantize(weight, **options)
    if method == "awq":
        return packers.awq_quantize(weight, **options)
    return packers.fp8_quantize(weight, **options)


def quantized_checkpoint(arch: str, method: str, out: Path, quant_config: dict,
                         options: dict | None = None, skip: tuple[str, ...] = (),
                         edit=None) -> tuple[Path, dict]:
    """(model dir, oracle state). ``options`` go to the packer; ``skip`` names modules left
    dense; ``edit(state)`` may break the written checkpoint (bad-checkpoint tests)."""
    from safetensors.torch import load_file, save_file
    src = build_tiny_model(arch)
    state = load_file(str(src / "model.safetensors"))
    oracle, written = dict(state), dict(state)
    conv1d = arch == "gpt2"  # HF Conv1D stores [in, out]; the quantizers take [out, in]
    for module in quantized_modules(arch, state, skip):
        weight = state[module + ".weight"]
        tensors, deq = _quantize(method, weight.t() if conv1d else weight, options or {})
        oracle[module + ".weight"] = deq.t().contiguous() if conv1d else deq
        if method != "fp8":
            del written[module + ".weight"]
        written.update({f"{module}.{k}": v for k, v in tensors.items()})
    if edit is not None:
        edit(written)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in written.items()}, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quant_config
    (out / "config.json").write_text(json.dumps(config))
    return out, oracle


def hf_oracle(arch: str, state: dict):
    """An fp32 HF model of the tiny architecture holding ``state``."""
    from transformers import AutoModelForCausalLM
    kwargs = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(arch), dtype=torch.float32,
                                                 **kwargs)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k or "bias" in k for k in missing), missing  # tied / buffers
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = []
    for ids in prompts:  # one at a time: no padding in the oracle
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_tokens, do_sample=False)
        outputs.append(out[0, len(ids):].tolist())
    return outputs
