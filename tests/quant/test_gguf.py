"""GGUF files (``--model x.gguf``) against the ``gguf`` package and Hugging Face transformers.

Files are written by ``gguf.GGUFWriter`` (``gguf_files.py``): legacy types quantized by
``gguf.quants.quantize``, K-quant blocks packed by hand from llama.cpp's layouts. Oracles:
every GGML type's dequantization equals ``gguf.quants.dequantize`` (on real and on random
blocks); the engine's greedy tokens equal transformers loading the same file
(``from_pretrained(dir, gguf_file=...)``, which dequantizes it), and its tokenizer (from the
file's metadata) encodes text as transformers' does. Skipped without the ``gguf`` package.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.quant.checkpoints import hf_greedy
from tests.quant.test_quantized_models import MAX_TOKENS, _engine_greedy, _prompts

gguf = pytest.importorskip("gguf")

from tests.quant.gguf_files import pack_k, write_gguf  # noqa: E402 - needs the gguf package

KINDS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "F16", "BF16", "F32"]
# largest |error| of each type's round trip on N(0, 0.15) weights (a check that the hand
# packers follow the layout: a misplaced bit shows as an error far above these)
ROUND_TRIP = {"Q2_K": 0.2, "Q3_K": 0.12, "Q4_0": 0.06, "Q4_1": 0.04, "Q4_K": 0.04,
              "Q5_0": 0.03, "Q5_1": 0.02, "Q5_K": 0.02, "Q6_K": 0.012, "Q8_0": 0.004,
              "F16": 1e-3, "BF16": 2e-3, "F32": 0.0}


def _blocks(weight: np.ndarray, kind: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    return pack_k(weight, kind) if kind.endswith("_K") else gguf.quants.quantize(weight, qtype)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_matches_the_gguf_package(kind):
    from pagedllm.quant.gguf_dequant import TYPES, dequantize
    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.15, (8, 512)).astype(np.float32)
    raw = _blocks(weight, kind)
    ours = dequantize(torch.from_numpy(raw.view(np.uint8).copy()), int(qtype), weight.shape)
    theirs = gguf.quants.dequantize(raw, qtype)
    assert torch.equal(ours, torch.from_numpy(theirs.astype(np.float32)))
    assert np.abs(theirs - weight).max() <= ROUND_TRIP[kind]
    _, elements, size = TYPES[int(qtype)]
    if elements > 1:  # every bit pattern: random blocks (finite scales only)
        noise = rng.integers(0, 256, (16, 4 * size), dtype=np.uint8)
        theirs = gguf.quants.dequantize(noise, qtype)
        ours = dequantize(torch.from_numpy(noise), int(qtype), (16, 4 * elements)).numpy()
        finite = np.isfinite(theirs)
        assert finite.mean() > 0.5 and np.array_equal(ours[finite], theirs[finite])


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


# a Q4_K_M-like mix, the legacy types one per tensor kind, the other K-quants, and Qwen2
# (tied embeddings, q/k/v biases, no rotary permutation)
CASES = {
    "llama-q4_k_m": ("llama", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output.": "Q6_K",
                               "token_embd": "Q4_K", "*": "Q4_K"}),
    "llama-legacy": ("llama", {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0",
                               "attn_output": "Q5_1", "ffn_gate": "Q8_0", "ffn_up": "F16",
                               "ffn_down": "BF16", "token_embd": "F32", "*": "Q8_0"}),
    "llama-k-quants": ("llama", {"attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "Q5_K",
                                 "ffn": "Q3_K", "*": "Q5_K"}),
    "qwen2-mixed": ("qwen2", {"attn_q": "Q4_0", "attn_k": "Q8_0", "ffn_up": "Q4_K",
                              "*": "Q6_K"}),
    # every decoder layer keeps its blocks (one type per fused layer)
    "llama-q4_0-kept": ("llama", {"token_embd": "Q8_0", "*": "Q4_0"}),
    "qwen2-q5_k-kept": ("qwen2", {"ffn_down": "Q6_K", "*": "Q5_K"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_hf_on_the_same_file(case, tmp_path):
    arch, types = CASES[case]
    path = write_gguf(arch, tmp_path / f"{case}.gguf", types)
    assert _engine_greedy(path) == hf_greedy(_hf_model(path), _prompts(), MAX_TOKENS)


def test_layers_keep_their_blocks(tmp_path):
    """A layer whose parts share one block type holds the file's bytes (uint8 blocks, not a
    dense weight); one mixing types (q/k Q4_K, v Q6_K) and F16 layers are dense."""
    from pagedllm.arg_utils import EngineArgs
    from pagedllm.models.loader import load_model
    path = write_gguf("llama", tmp_path / "m.gguf", {"attn_v": "Q6_K", "ffn_up": "F16",
                                                     "*": "Q4_K"})
    config = EngineArgs(model=str(path), dtype="float32").create_engine_config()
    model = load_model(config.model, config.load, torch.device("cpu"))
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.dtype == torch.uint8
    assert tuple(layer.self_attn.o_proj.weight.shape) == (256, 1, 144)     # Q4_K blocks
    assert layer.mlp.down_proj.weight.dtype == torch.uint8
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float32          # Q4_K + Q6_K
    assert layer.mlp.gate_up_proj.weight.dtype == torch.float32            # Q4_K + F16


def test_gguf_file_is_detected_and_its_tokenizer_used(tmp_path):
    """No flags: a .gguf --model selects --load-format / --quantization gguf (vLLM 0.6.3);
    text prompts go through the tokenizer in the file's metadata."""
    from transformers import AutoTokenizer

    from pagedllm.arg_utils import EngineArgs
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    path = write_gguf("llama", tmp_path / "model.gguf", {"*": "Q8_0"})
    config = EngineArgs(model=str(path), dtype="float32").create_engine_config()
    assert (config.load.load_format, config.model.quantization) == ("gguf", "gguf")
    assert config.model.hf_config.architectures == ["LlamaForCausalLM"]
    text = "The for statement is used to iterate over"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    expected_ids = tokenizer(text).input_ids
    llm = LLM(model=str(path), dtype="float32", block_size=8)
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == expected_ids
    hf = _hf_model(path).generate(torch.tensor([expected_ids]), max_new_tokens=6,
                                  do_sample=False)
    assert list(out.outputs[0].token_ids) == hf[0, len(expected_ids):].tolist()
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids)


def _config(model, **flags):
    from pagedllm.arg_utils import EngineArgs
    return EngineArgs(model=str(model), dtype="float32", **flags).create_engine_config()


def test_flags_that_contradict_a_gguf_file(tmp_path):
    from tests.utils.tiny_models import build_tiny_model
    path = write_gguf("llama", tmp_path / "model.gguf", {"*": "Q8_0"})
    with pytest.raises(ValueError, match="GGUF file; --load-format safetensors"):
        _config(path, load_format="safetensors")
    with pytest.raises(ValueError, match="GGUF file; --quantization awq"):
        _config(path, quantization="awq")
    assert _config(path, load_format="gguf", quantization="gguf").load.load_format == "gguf"
    assert _config(path, tokenizer=str(path)).model.tokenizer_path == str(path.resolve())
    with pytest.raises(ValueError, match="--load-format gguf needs --model to be a local .gguf"):
        _config(build_tiny_model("llama"), load_format="gguf")
    with pytest.raises(ValueError, match="--quantization gguf needs --model to be a local"):
        _config(build_tiny_model("llama"), quantization="gguf")


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    """A GGML type without a dequantizer here (TQ2_0) fails while loading, naming it."""
    from pagedllm.entrypoints.llm import LLM
    path = tmp_path / "model.gguf"
    import tests.quant.gguf_files as files
    original = files.quantize

    def with_ternary(weight, kind):
        if kind == "TQ2_0":
            qtype = gguf.GGMLQuantizationType.TQ2_0
            return gguf.quants.quantize(weight, qtype), qtype
        return original(weight, kind)

    files.quantize = with_ternary
    try:
        write_gguf("llama", path, {"ffn_up": "TQ2_0", "*": "Q8_0"})
    finally:
        files.quantize = original
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*GGML type 35.*supported: "):
        LLM(model=str(path), dtype="float32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith(("F", "BF"))])
def test_dequantize_on_cuda_equals_cpu_and_captures(kind):
    from pagedllm.quant.gguf_dequant import dequantize
    qtype = gguf.GGMLQuantizationType[kind]
    weight = np.random.default_rng(4).normal(0, 0.15, (16, 512)).astype(np.float32)
    raw = torch.from_numpy(_blocks(weight, kind).view(np.uint8).copy())
    expected = dequantize(raw, int(qtype), weight.shape)
    device_raw = raw.cuda()
    assert torch.equal(dequantize(device_raw, int(qtype), weight.shape).cpu(), expected)
    graph = torch.cuda.CUDAGraph()  # kept GGUF layers dequantize inside captured steps
    with torch.cuda.graph(graph):
        out = dequantize(device_raw, int(qtype), weight.shape)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), expected)
