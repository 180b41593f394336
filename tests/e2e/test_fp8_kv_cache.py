"""fp8 KV cache (--kv-cache-dtype, --quantization-param-path) on the PyTorch path: storage
dtype, quantization round trip, logprobs close to the full-precision cache, scale files."""
import json

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.attention.kv_quant import load_kv_scales, quantize
from pagedllm.attention.torch_ref import paged_attention, write_kv_cache
from pagedllm.attention.backend import AttentionMetadata
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement is used to iterate over", "def f(x):\n    return x"]
PROMPTS_LONG = ["The for statement is used to iterate over the elements of a sequence such as "
                "a string", "def f(x):\n    return x"]
# Documented fp8 tolerance (mean, max) of |prompt logprob - fp32 cache's| on the tiny random
# test model (measured: e4m3 0.06 / 0.25, e5m2 0.13 / 0.51; e4m3 keeps 3 mantissa bits, e5m2 2).
LOGPROB_TOL = {"fp8_e4m3": (0.1, 0.4), "fp8_e5m2": (0.2, 0.8)}


@pytest.fixture(scope="module")
def model_path():
    return str(build_tiny_model("llama"))


@pytest.mark.parametrize("dtype,torch_dtype", [("fp8_e4m3", torch.float8_e4m3fn),
                                               ("fp8_e5m2", torch.float8_e5m2)])
def test_reference_attention_on_fp8_cache(dtype, torch_dtype):
    """Scaled fp8 writes + reads equal attention over the dequantized keys and values."""
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(10, 2, 8, generator=gen) * 3, torch.randn(10, 2, 8, generator=gen)
    q = torch.randn(1, 4, 8, generator=gen)
    slots = torch.arange(10)
    meta = AttentionMetadata(4, slots, 1, torch.tensor([10]), torch.tensor([[0, 1, 2]]), [])
    cache = torch.zeros(2, 12, 2, 8, dtype=torch_dtype)
    write_kv_cache(cache, k, v, slots, k_scale=0.5, v_scale=0.25)
    stored = cache.view(torch.uint8)[0, :10].view(torch_dtype)
    assert torch.equal(stored.float(), quantize(k, torch_dtype, 0.5).float())
    ref_cache = torch.zeros(2, 12, 2, 8)
    write_kv_cache(ref_cache, quantize(k, torch_dtype, 0.5).float() * 0.5,
                   quantize(v, torch_dtype, 0.25).float() * 0.25, slots)
    out = paged_attention(q, cache, meta, scale=0.3, k_scale=0.5, v_scale=0.25)
    expected = paged_attention(q, ref_cache, meta, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # quantization saturates instead of overflowing to NaN
    big = quantize(torch.tensor([1e9, -1e9]), torch_dtype, 1.0).float()
    assert torch.isfinite(big).all()


def _prompt_logprob_errors(reference, outputs):
    """|logprob difference| of every scored prompt token between two runs."""
    errors = []
    for a, b in zip(reference, outputs):
        for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            token = next(iter(la))
            errors.append(abs(la[token].logprob - lb[token].logprob))
    return errors


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cache_logprobs_close_to_full_precision(model_path, kv_dtype):
    """Prompt logprobs (every position reads the cache) against the fp32 cache's, within the
    documented tolerance; a badly scaled fp8 cache (scale 1e4: keys and values underflow to
    zero) is far outside it, so the check has teeth."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    full = LLM(model=model_path).generate(PROMPTS_LONG, params, use_tqdm=False)
    llm = LLM(model=model_path, kv_cache_dtype=kv_dtype, num_scheduler_steps=4)
    assert llm.llm_engine.worker.runner.cache.gpu_cache[0].dtype == \
        {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_dtype]
    errors = _prompt_logprob_errors(full, llm.generate(PROMPTS_LONG, params, use_tqdm=False))
    mean_tol, max_tol = LOGPROB_TOL[kv_dtype]
    assert sum(errors) / len(errors) < mean_tol and max(errors) < max_tol
    if kv_dtype == "fp8_e5m2":  # its error is already close to the bad-scale level below
        return
    worker = llm.llm_engine.worker
    worker.runner.kv_scales = [(1e4, 1e4)] * len(worker.runner.kv_scales)
    bad = _prompt_logprob_errors(full, llm.generate(PROMPTS_LONG, params, use_tqdm=False))
    assert sum(bad) / len(bad) > 2 * mean_tol


def test_fp8_cache_block_bytes_and_default_scales(model_path):
    full = LLM(model=model_path, num_gpu_blocks_override=8).llm_engine.worker
    fp8 = LLM(model=model_path, num_gpu_blocks_override=8, kv_cache_dtype="fp8")
    itemsize = fp8.llm_engine.config.model.torch_dtype.itemsize  # fp32 on CPU, bf16 on CUDA
    assert fp8.llm_engine.worker.block_bytes * itemsize == full.block_bytes
    assert fp8.llm_engine.worker.runner.kv_scales == \
        [(1.0, 1.0)] * fp8.llm_engine.config.model.num_hidden_layers


def test_scale_file(tmp_path, model_path):
    path = tmp_path / "scales.json"
    path.write_text(json.dumps({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {str(i): 0.5 + i for i in range(2)}}}}))
    assert load_kv_scales(str(path), 2, 0, torch.float8_e4m3fn) == [(0.5, 0.5), (1.5, 1.5)]
    with pytest.raises(ValueError, match="--quantization-param-path.*fp8_e5m2"):
        load_kv_scales(str(path), 2, 0, torch.float8_e5m2)
    with pytest.raises(ValueError, match="--quantization-param-path.*layer 2"):
        load_kv_scales(str(path), 3, 0, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="--quantization-param-path.*rank 1"):
        load_kv_scales(str(path), 2, 1, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="--quantization-param-path.*needs --kv-cache-dtype"):
        LLM(model=model_path, quantization_param_path=str(path))
    num_layers = LLM(model=model_path, num_gpu_blocks_override=8).llm_engine.config.model \
        .num_hidden_layers
    path.write_text(json.dumps({"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {str(i): 0.05 for i in range(num_layers)}}}}))
    llm = LLM(model=model_path, kv_cache_dtype="fp8", quantization_param_path=str(path))
    assert llm.llm_engine.worker.runner.kv_scales == [(0.05, 0.05)] * num_layers
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in out)
