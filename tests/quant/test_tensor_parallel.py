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


def test_tp2_gguf(tmp_path):
    """GGUF blocks split by rows (column-parallel) and by whole 32-element blocks
    (row-parallel o/down, Q4_0 / Q8_0 kept as blocks); q/k/v mixes types: dequantized at
    load, split like a dense weight."""
    pytest.importorskip("gguf")
    from tests.quant.gguf_files import write_gguf
    path = write_gguf("llama", tmp_path / "m.gguf", {"attn_v": "Q5_1", "ffn_down": "Q8_0",
                                                     "*": "Q4_0"})
    assert _tokens(path, 2) == _tokens(path, 1)


def test_tp2_int8_w8a8_static(tmp_path):
    """int8 weights with per-tensor scales (one per fused part) and a static activation
    scale: the same int8 activations on every rank."""
    pytest.importorskip("compressed_tensors")
    from tests.quant.test_compressed_tensors import INT8_CASES, ct_checkpoint
    path = ct_checkpoint("llama", INT8_CASES["w8a8-tensor-static"], "int-quantized",
                         tmp_path / "ct", input_scale=0.02)
    assert _tokens(path, 2) == _tokens(path, 1)


def test_tp2_bitsandbytes_nf4(tmp_path):
    """Packed 4-bit rows split by output, packed bytes and 64-wide scale blocks by input (a
    128-wide llama: each row-parallel rank keeps whole blocks)."""
    pytest.importorskip("bitsandbytes")
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model
    src = tmp_path / "dense"
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(src)
    for f in build_tiny_model("llama").iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, src / f.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                    bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True),
        dtype=torch.float32, device_map="cpu")
    path = tmp_path / "nf4"
    quantized.save_pretrained(path)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, path / f.name)
    assert _tokens(path, 2) == _tokens(path, 1)
