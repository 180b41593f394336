"""``--quantization experts_int8``: MoE expert weights quantized to int8 per output channel at
load, dense layers unquantized (vLLM 0.6.3's method).

Oracles, on the tiny Mixtral, Qwen2-MoE (a shared expert with its gate: stays dense) and
DeepSeek-V3 checkpoints of ``tests/models``:
1. exact: a reference written here (per row: ``scale = max|w| / 127``, ``q = clamp(round(w /
   scale), -127, 127)``, weight ``q * scale`` in fp32) rewrites the checkpoint's expert
   tensors as their dequantized values; pagedllm with ``--quantization experts_int8`` on the
   original checkpoint gives the same greedy tokens and bit-identical top-5 logprobs as
   pagedllm on that dequantized checkpoint, whose greedy tokens equal Hugging Face's on it;
2. close: the first generated position's top-5 logprobs stay within ``LOGPROB_ATOL`` of
   unquantized Hugging Face's (int8 error only);
3. storage: expert weights are int8 with fp32 per-row scales (a quarter of fp32's bytes),
   every other parameter keeps the model dtype;
4. tensor parallelism 2: each rank quantizes its slice (down rows cover the rank's half of
   the intermediate dim, as vLLM): equals the reference that does the same;
5. a dense model with the flag fails at start-up naming it and the MoE architectures.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.models.test_models_vs_hf import _prompts
from tests.utils.tiny_models import build_tiny_model

MAX_TOKENS = 8
# int8 per-channel experts vs unquantized, tiny random models (large weights), fp32: the
# observed worst is 0.045 (Mixtral) and 0.024 (DeepSeek-V3)
LOGPROB_ATOL = 0.1
_EXPERT = re.compile(r"\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)\.weight$")
_DOWN = ("w2", "down_proj")


def _tiny(arch: str) -> Path:
    if arch != "deepseek_v3":
        from tests.models.test_moe_models import build_tiny_moe
        return build_tiny_moe(arch)
    from tests.models.test_deepseek_models import build_tiny_deepseek
    return build_tiny_deepseek("deepseek_v3")


def reference_int8(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 quantization, dequantized back to fp32."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def _dequantized_copy(src: Path, dst: Path, tp: int = 1) -> Path:
    """``src`` with every expert tensor replaced by its reference-dequantized value; a down
    projection is quantized per tensor-parallel slice of its columns (what each rank holds)."""
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, dst / item.name)
    state = load_file(str(src / "model.safetensors"))
    for name, tensor in state.items():
        match = _EXPERT.search(name)
        if match is None:
            continue
        parts = tensor.chunk(tp, dim=1) if match.group(1) in _DOWN else [tensor]
        state[name] = torch.cat([reference_int8(p) for p in parts], dim=1).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _run(path: Path, **flags) -> tuple[list[list[int]], list[list[dict]], object]:
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    llm = LLM(model=str(path), dtype="float32", block_size=8, **flags)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    try:
        outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params,
                            use_tqdm=False)
    finally:
        if flags.get("tensor_parallel_size", 1) > 1:
            llm.llm_engine.executor.shutdown()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                for o in outs]
    return tokens, logprobs, llm


def _hf(path: Path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _hf_greedy(model) -> list[list[int]]:
    outs = []
    for ids in _prompts():
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=MAX_TOKENS, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_matches_dequantized_reference_exactly_and_hf_closely(arch, tmp_path):
    src = _tiny(arch)
    tokens, logprobs, llm = _run(src, quantization="experts_int8")
    ref_tokens, ref_logprobs, _ = _run(_dequantized_copy(src, tmp_path / "deq"))
    assert tokens == ref_tokens
    assert logprobs == ref_logprobs  # bit-identical: same int8 values, same dequantization
    assert tokens == _hf_greedy(_hf(tmp_path / "deq"))
    hf = _hf(src)
    for ids, steps in zip(_prompts(), logprobs):
        with torch.no_grad():
            exact = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
        for token, value in steps[0].items():
            assert abs(value - exact[token].item()) < LOGPROB_ATOL
    _check_storage(llm.llm_engine.worker.runner.model)


def _check_storage(model) -> None:
    from pagedllm.layers.moe import FusedMoE
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert experts
    for layer in experts:
        assert layer.quant_method.name == "experts_int8"
        assert layer.gate_up_proj.dtype == layer.down_proj.dtype == torch.int8
        assert layer.gate_up_proj_scale.shape == layer.gate_up_proj.shape[:2]
        assert layer.down_proj_scale.dtype == torch.float32
    quantized = {id(p) for m in experts for p in m.parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters() if id(p) not in quantized)
    for module in model.modules():  # dense layers keep the dense method
        method = getattr(module, "quant_method", None)
        if method is not None and not isinstance(module, FusedMoE):
            assert method.name == "unquantized"


def test_tp2_matches_per_rank_reference(tmp_path):
    src = _tiny("mixtral")
    tokens, logprobs, _ = _run(src, quantization="experts_int8", tensor_parallel_size=2,
                               device="cpu", num_gpu_blocks_override=64, max_model_len=256)
    ref = _dequantized_copy(src, tmp_path / "deq2", tp=2)
    assert tokens == _hf_greedy(_hf(ref))
    ref_tokens, ref_logprobs, _ = _run(ref, tensor_parallel_size=2, device="cpu",
                                       num_gpu_blocks_override=64, max_model_len=256)
    assert tokens == ref_tokens
    for ours, theirs in zip(logprobs, ref_logprobs):  # all-reduce order may differ
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_dense_model_fails_at_startup_naming_the_flag():
    from pagedllm.arg_utils import EngineArgs
    with pytest.raises(ValueError, match=r"--quantization experts_int8 quantizes "
                                         r"mixture-of-experts.*LlamaForCausalLM has no experts; "
                                         r"supported: .*DeepseekV2ForCausalLM.*"
                                         r"MixtralForCausalLM.*Qwen3MoeForCausalLM"):
        EngineArgs(model=str(build_tiny_model("llama")), dtype="float32",
                   quantization="experts_int8").create_engine_config()


def test_quantize_rows_unit():
    from pagedllm.quant.experts_int8 import dequantize_rows, quantize_rows
    w = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    w[1, 2] = 0.0  # an all-zero row stays zero (no 0/0)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 5)
    assert q.abs().amax(-1)[scale > 1e-30].eq(127).all()
    deq = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(deq[0], reference_int8(w[0]))
    assert torch.equal(deq[1, 2], torch.zeros(7))
    assert ((deq - w).abs() <= scale.unsqueeze(-1) / 2 + 1e-7).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_dequantized_reference(tmp_path):
    src = _tiny("mixtral")
    tokens, _, _ = _run(src, quantization="experts_int8", device="cuda")
    assert tokens == _hf_greedy(_hf(_dequantized_copy(src, tmp_path / "deq")))


def test_flag_help_lists_experts_int8():
    from pagedllm.quant.config import NOT_BUILT, SUPPORTED
    assert "experts_int8" in SUPPORTED and "experts_int8" not in NOT_BUILT
