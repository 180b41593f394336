"""Quantized checkpoints at --tensor-parallel-size 2 (mp executor, gloo, CPU): the same greedy
tokens as one rank (which equals the HF oracle, ``test_quantized_models``). Group size 16 on
the tiny llama splits packed words, groups and g_idx across the ranks: column-parallel
q/k/v and gate/up by packed output words, row-parallel o/down by packed input rows and groups
(``desc_act``: g_idx split, scales whole)."""
from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.quant.checkpoints import quantized_checkpoint

PROMPTS = ["The for statement", "A class is", "def f(x):"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(device="cpu", num_gpu_blocks_override=64, max_model_len=256, dtype="float32")

CASES = {
    "gptq-4bit-desc-act-asym": ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 16,
                                         "desc_act": True, "sym": False},
                                dict(bits=4, group_size=16, desc_act=True, sym=False)),
    "gptq-8bit-g16": ("gptq", {"quant_method": "gptq", "bits": 8, "group_size": 16,
                               "desc_act": False, "sym": True}, dict(bits=8, group_size=16)),
    "awq-g16": ("awq", {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
                        "version": "gemm"}, dict(group_size=16)),
    "fp8-static": ("fp8", {"quant_method": "fp8", "activation_scheme": "static"},
                   dict(input_scale=0.02)),
}


def _tokens(path, tp: int) -> list:
    llm = LLM(model=str(path), tensor_parallel_size=tp, **ENGINE)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.llm_engine.executor.shutdown()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_greedy_tokens_equal_tp1(case, tmp_path):
    method, config, options = CASES[case]
    path, _ = quantized_checkpoint("llama", method, tmp_path / case, config, options)
    assert _tokens(path, 2) == _tokens(path, 1)


def test_tp2_compressed_tensors_asym_pack_quantized(tmp_path):
    """Zero points packed along the output and group scales along the input, split at tp=2
    (checkpoint written by the compressed-tensors library)."""
    pytest.importorskip("compressed_tensors")
    from tests.quant.test_compressed_tensors import ct_checkpoint
    weights = dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=16)
    path = ct_checkpoint("llama", dict(weights=weights), "pack-quantized", tmp_path / "ct")
    assert _tokens(path, 2) == _tokens(path, 1)
