"""bitsandbytes checkpoints and in-flight NF4 quantization against the bitsandbytes library.

Checkpoints are written by transformers + bitsandbytes on CPU (``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` then ``save_pretrained``). Oracles:
- 4-bit: an fp32 HF model holding bitsandbytes' own ``dequantize_4bit`` of each checkpoint
  tensor (``QuantState.from_dict``); pagedllm's unpacking equals it exactly.
- 8-bit: an fp32 HF model whose quantized layers run bitsandbytes' own LLM.int8 ops
  (``int8_vectorwise_quant`` + ``int8_mixed_scaled_mm``) on the checkpoint's int8 weights.
- in-flight (``--quantization bitsandbytes --load-format bitsandbytes``): each module quantized
  by bitsandbytes' ``quantize_4bit`` (NF4, double quantization) and dequantized by it; the
  engine's codes and scales also equal the checkpoint transformers writes for the same model.
Greedy tokens must be equal. transformers' own forward of a bitsandbytes model on CPU is not
the oracle: its 4-bit path rounds differently from bitsandbytes' dequantization (one token in
36 flipped on these tiny models) and its 8-bit path casts activations to fp16.
Skipped without the ``bitsandbytes`` package.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from tests.quant.checkpoints import hf_greedy, hf_oracle
from tests.quant.test_quantized_models import MAX_TOKENS, _engine_greedy, _prompts
from tests.utils.tiny_models import build_tiny_model

bnb = pytest.importorskip("bitsandbytes")


def bnb_checkpoint(arch: str, out, **options):
    """A tiny ``arch`` quantized by transformers + bitsandbytes and saved."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    src = build_tiny_model(arch)
    config = BitsAndBytesConfig(**options)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config,
                                                 dtype=torch.float32, device_map="cpu")
    model.save_pretrained(out)
    for f in src.iterdir():
        if not f.name.startswith(("model", "config")):
            shutil.copy(f, out / f.name)
    return out


def _state(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _bnb_dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 4-bit ``<module>.weight`` dequantized by bitsandbytes from its saved state."""
    from bitsandbytes.functional import QuantState, dequantize_4bit
    dense = dict(state)
    for key in [k for k in state if ".quant_state." in k]:
        weight = key.split(".quant_state.")[0]
        parts = {k[len(weight) + 1:]: v for k, v in state.items() if k.startswith(weight + ".")}
        quant_state = QuantState.from_dict(dict(parts), device=torch.device("cpu"))
        dense[weight] = dequantize_4bit(state[weight], quant_state).float()
        for k in parts:
            dense.pop(f"{weight}.{k}")
    return dense


FOUR_BIT = {
    "llama-nf4-double-quant": ("llama", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True)),
    "qwen2-fp4": ("qwen2", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "gpt2-nf4-conv1d": ("gpt2", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "phi3-nf4-fused-checkpoint": ("phi3", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True)),
    "llama-nf4-skip-down-proj": ("llama", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               llm_int8_skip_modules=["down_proj", "lm_head"])),
}


@pytest.mark.parametrize("case", sorted(FOUR_BIT))
def test_4bit_checkpoint_greedy_matches_bnb_dequantization(case, tmp_path):
    arch, options = FOUR_BIT[case]
    path = bnb_checkpoint(arch, tmp_path / case, bnb_4bit_compute_dtype=torch.float32,
                          **options)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    state = _state(path)
    if "skip" in case:
        assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    dense = _bnb_dequantized(state)
    if arch == "gpt2":  # transformers quantized the Conv1D weights as [out, in]
        conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
        dense = {k: v.t().contiguous() if k.endswith(conv1d) and ".h." in k else v
                 for k, v in dense.items()}
    oracle = hf_oracle(arch, dense)
    assert _engine_greedy(path) == hf_greedy(oracle, _prompts(), MAX_TOKENS)


def test_4bit_unpacking_equals_bnb_dequantize_4bit(tmp_path):
    from pagedllm.quant.bitsandbytes import _four_bit_stream, dequantize_4bit
    path = bnb_checkpoint("llama", tmp_path / "m", load_in_4bit=True,
                          bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    state = _state(path)
    ours = dict(_four_bit_stream(state.items(), "nf4"))
    expected = _bnb_dequantized(state)
    modules = [k[:-len(".weight_absmax")] for k in ours if k.endswith(".weight_absmax")]
    assert len(modules) == 14
    for weight in (m + ".weight" for m in modules):
        got = dequantize_4bit(ours[weight], ours[weight + "_absmax"], ours[weight + "_code"])
        assert torch.equal(got, expected[weight])


class _Int8Reference(nn.Module):
    """A linear layer run by bitsandbytes' own LLM.int8 ops on fp32 activations: its row-wise
    int8 quantization with outlier columns, its int8 matmul and its weight dequantization for
    the outlier columns. The int32 products are scaled by 1/127**2 as bitsandbytes' CUDA
    kernel does (MM_DEQUANT_CONST); its CPU fallback ``int8_mm_dequant`` uses 6.200124e-05,
    1.8e-5 off, which these tiny random models amplify into different greedy tokens."""

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.weight, self.scb, self.threshold = weight, scb, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().clone()
        ops = torch.ops.bitsandbytes
        ca, sca, outliers = ops.int8_vectorwise_quant(rows, self.threshold)
        product = ops.int8_linear_matmul(ca, self.weight).float()
        out = product * (sca.unsqueeze(1) * self.scb.unsqueeze(0)) * (1.0 / (127.0 * 127.0))
        if outliers is not None and outliers.numel():
            weight = ops.int8_vectorwise_dequant(self.weight[:, outliers].contiguous(), self.scb)
            out = out.addmm(rows[:, outliers], weight.t())
        return out.reshape(*x.shape[:-1], -1)


def _int8_oracle(arch: str, state: dict[str, torch.Tensor], threshold: float):
    from safetensors.torch import load_file
    base = load_file(str(build_tiny_model(arch) / "model.safetensors"))  # placeholders
    dense = {**base, **{k: v for k, v in state.items()
                        if v.dtype != torch.int8 and not k.endswith(("SCB", "weight_format"))}}
    model = hf_oracle(arch, dense)  # the int8 modules are replaced below
    for key in [k for k in state if k.endswith(".SCB")]:
        module = key[:-len(".SCB")]
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _Int8Reference(state[module + ".weight"], state[key], threshold))
    return model


@pytest.mark.parametrize("arch,threshold", [("llama", 6.0), ("llama", 0.0), ("gpt2", 6.0)])
def test_8bit_checkpoint_greedy_matches_bnb_int8_ops(arch, threshold, tmp_path):
    path = bnb_checkpoint(arch, tmp_path / "m", load_in_8bit=True,
                          llm_int8_threshold=threshold)
    state = _state(path)
    assert sum(v.dtype == torch.int8 for v in state.values()) >= 8
    oracle = _int8_oracle(arch, state, threshold)
    # one prompt at a time: a batch shares LLM.int8's outlier columns (as in bitsandbytes)
    assert _engine_greedy(path, one_at_a_time=True) == hf_greedy(oracle, _prompts(),
                                                                 MAX_TOKENS)


def test_int8_matmul_with_outliers_matches_bnb():
    """The LLM.int8 emulation against bitsandbytes' ops, with forced outlier columns."""
    from pagedllm.quant.bitsandbytes import int8_matmul
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=generator)
    scb = torch.rand(48, generator=generator) + 0.1
    for rows in (1, 7):
        x = torch.randn(rows, 96, generator=generator)
        x[:, 5] *= 20
        x[0, 40] = -9.0
        reference = _Int8Reference(weight, scb, 6.0)(x)
        ours = int8_matmul(x, weight, scb, 6.0)
        assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-3)
        plain = int8_matmul(x, weight, scb, 0.0)
        assert not torch.allclose(plain, reference, rtol=1e-2, atol=1e-1)


def _quantize_like_bnb(state: dict[str, torch.Tensor],
                       targets: tuple[str, ...] = ("proj",)) -> dict[str, torch.Tensor]:
    """Each decoder linear weight (whose module name ends with one of ``targets``) through
    bitsandbytes' NF4 quantize + dequantize."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    out = dict(state)
    for key, value in state.items():
        if ".layers." in key and key[:-len(".weight")].endswith(targets):
            q, quant_state = quantize_4bit(value.float(), blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
            out[key] = dequantize_4bit(q, quant_state)
    return out


def test_in_flight_nf4_matches_bnb_and_the_transformers_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from pagedllm.arg_utils import EngineArgs
    from pagedllm.models.loader import load_model
    from pagedllm.quant.bitsandbytes import _four_bit_stream
    src = build_tiny_model("llama")
    flags = dict(quantization="bitsandbytes", load_format="bitsandbytes")
    config = EngineArgs(model=str(src), dtype="float32", **flags).create_engine_config()
    assert config.model.quant_config.describe().startswith("bitsandbytes 4-bit nf4 (quantized")
    oracle = hf_oracle("llama", _quantize_like_bnb(load_file(str(src / "model.safetensors"))))
    assert _engine_greedy(src, **flags) == hf_greedy(oracle, _prompts(), MAX_TOKENS)
    # the engine's codes and scales equal what transformers + bitsandbytes save
    saved = bnb_checkpoint("llama", tmp_path / "m", load_in_4bit=True,
                           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    expected = dict(_four_bit_stream(_state(saved).items(), "nf4"))
    model = load_model(config.model, config.load, torch.device("cpu"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    prefix = "model.layers.0.self_attn."
    assert torch.equal(qkv.weight, torch.cat([expected[prefix + p + ".weight"]
                                              for p in ("q_proj", "k_proj", "v_proj")]))
    assert torch.allclose(qkv.weight_absmax, torch.cat(
        [expected[prefix + p + ".weight_absmax"] for p in ("q_proj", "k_proj", "v_proj")]))


def _config(model, **flags):
    from pagedllm.arg_utils import EngineArgs
    return EngineArgs(model=str(model), dtype="float32", **flags).create_engine_config()


def test_bitsandbytes_flag_errors(tmp_path):
    src = build_tiny_model("llama")
    with pytest.raises(ValueError, match="--quantization bitsandbytes on .* pass --load-format"
                                         " bitsandbytes"):
        _config(src, quantization="bitsandbytes")
    with pytest.raises(ValueError, match="--load-format bitsandbytes .* needs --quantization "
                                         "bitsandbytes"):
        _config(src, load_format="bitsandbytes")
    path = bnb_checkpoint("llama", tmp_path / "m", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    assert _config(path).model.quant_config.name == "bitsandbytes"
    assert _config(path, quantization="bitsandbytes",
                   load_format="bitsandbytes").model.quant_config.bits == 4


def test_incomplete_4bit_checkpoint_names_the_tensor(tmp_path):
    from safetensors.torch import save_file

    from pagedllm.entrypoints.llm import LLM
    path = bnb_checkpoint("llama", tmp_path / "m", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    state = _state(path)
    del state["model.layers.1.mlp.down_proj.weight.absmax"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight is incomplete, "
                                         r"missing \['model.layers.1.mlp.down_proj.weight.absmax"):
        LLM(model=str(path), dtype="float32")


def _peft_adapter(out, targets: list[str]) -> str:
    """A PEFT LoRA on the tiny llama with random A and B, saved by PEFT."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama"), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=targets))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ["gate_proj", "up_proj", "down_proj"]])
def test_qlora_adapter_on_an_nf4_base_matches_bnb_plus_peft(targets, tmp_path):
    """--qlora-adapter-name-or-path quantizes the adapter's target modules at load (the
    others stay dense); the adapter runs through --enable-lora. Oracle: HF + PEFT with the
    same adapter on the base whose target weights went through bitsandbytes' NF4."""
    import peft
    from safetensors.torch import load_file

    from pagedllm import LLM, LoRARequest, SamplingParams
    src = build_tiny_model("llama")
    adapter = _peft_adapter(tmp_path / "adapter", targets)
    llm = LLM(model=str(src), dtype="float32", block_size=8, quantization="bitsandbytes",
              load_format="bitsandbytes", qlora_adapter_name_or_path=adapter,
              enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False,
                        lora_request=LoRARequest("qlora", 1, adapter))
    base = _quantize_like_bnb(load_file(str(src / "model.safetensors")), tuple(targets))
    oracle = peft.PeftModel.from_pretrained(hf_oracle("llama", base), adapter).eval()
    expected = hf_greedy(oracle, _prompts(), MAX_TOKENS)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_qlora_flag_errors(tmp_path):
    src = build_tiny_model("llama")
    adapter = _peft_adapter(tmp_path / "qv", ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="--qlora-adapter-name-or-path needs --quantization "
                                         "bitsandbytes and --load-format bitsandbytes"):
        _config(src, qlora_adapter_name_or_path=adapter)
    with pytest.raises(ValueError, match=r"target_modules cover only some of \['q_proj', "
                                         r"'k_proj', 'v_proj'\]"):
        from pagedllm import LLM
        LLM(model=str(src), dtype="float32", quantization="bitsandbytes",
            load_format="bitsandbytes", qlora_adapter_name_or_path=adapter)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_int8_matmul_and_4bit_dequantize_in_a_cuda_graph():
    """The CUDA branch of LLM.int8 (no host sync) captures in a CUDA graph and matches the
    CPU path; the 4-bit dequantization gives the same weights on CUDA."""
    from pagedllm.quant.bitsandbytes import dequantize_4bit, int8_matmul
    generator = torch.Generator().manual_seed(1)
    weight = torch.randint(-127, 128, (256, 512), dtype=torch.int8, generator=generator)
    scb = torch.rand(256, generator=generator) + 0.1
    x = torch.randn(4, 512, generator=generator)
    x[:, 7] *= 30
    expected = int8_matmul(x, weight, scb, 6.0)
    xc, wc, sc = x.cuda(), weight.cuda(), scb.cuda()
    int8_matmul(xc, wc, sc, 6.0)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int8_matmul(xc, wc, sc, 6.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out.cpu(), expected, rtol=1e-4, atol=1e-3)
    packed = torch.randint(0, 256, (64, 256), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(64, 8, generator=generator)
    code = torch.linspace(-1, 1, 16)
    assert torch.equal(dequantize_4bit(packed.cuda(), absmax.cuda(), code.cuda()).cpu(),
                       dequantize_4bit(packed, absmax, code))
