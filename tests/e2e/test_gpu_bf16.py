"""The CUDA path in bf16 against Hugging Face transformers in bf16 on the same GPU (the oracle),
for a batch of one (decode through the Triton GEMV with fused SiLU, sent every shape here, the
fused rotary + KV write, CUDA graphs) and a batch of three (cuBLAS), on the architectures whose
layers the fused kernels serve (Llama, Qwen2 with qkv bias, Qwen3 with q/k norms, Phi-3 with
partial rotary, Gemma, OPT). Skipped without CUDA.

Two bf16 implementations round differently (fused kernels, other GEMM tiles), so a greedy
token may flip where two logits are within rounding of each other; the rule is therefore
teacher-forced: HF scores the prompt plus our greedy tokens, and at every step our token is
HF's argmax within ``LOGPROB_ATOL`` and our logprob of it is within ``LOGPROB_ATOL`` of HF's.
"""
from __future__ import annotations

import pytest
import torch

from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAX_TOKENS = 16
LOGPROB_ATOL = 0.1


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(77)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (25, 9, 40)]


def _check_against_hf(hf, prompt: list[int], tokens: list[int], logprobs: list[float],
                      what: str) -> None:
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens, device="cuda")]
    margin = (lp.max(dim=-1).values - chosen).max().item()  # 0 when ours is HF's argmax
    diff = (chosen - torch.tensor(logprobs, device="cuda")).abs().max().item()
    assert margin < LOGPROB_ATOL, f"{what}: a token is {margin:.3f} below HF's greedy choice"
    assert diff < LOGPROB_ATOL, f"{what}: logprobs differ from HF's by up to {diff:.3f}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma", "opt"])
def test_bf16_matches_hf_teacher_forced(arch, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pagedllm import LLM, SamplingParams
    from pagedllm.layers import fused
    monkeypatch.setattr(fused, "_GEMV", "all")  # the tiny shapes are not tuned ones
    path = str(build_tiny_model(arch))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    prompts = _prompts()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    for batch in ([prompts[0]], prompts):  # one row: GEMV path; three rows: cuBLAS
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)
        for i, out in enumerate(outs):
            tokens = list(out.outputs[0].token_ids)
            assert len(tokens) == MAX_TOKENS
            lps = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, tokens)]
            _check_against_hf(hf, batch[i], tokens, lps, f"{arch} batch {len(batch)} row {i}")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pdl_same_tokens_as_plain_launches(arch, monkeypatch):
    """Programmatic dependent launch (pagedllm/layers/pdl.py) only lets kernels start early;
    the same kernels then compute the same numbers: greedy tokens and logprobs equal those of
    plain launches, with CUDA graphs and multi-step decode, batch 1 (GEMV) and 3."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.layers import fused, pdl
    if not pdl.enabled(torch.empty(0, device="cuda")):
        pytest.skip("PDL needs compute capability 9.0+ and Triton's GDC intrinsics")
    monkeypatch.setattr(fused, "_GEMV", "all")
    path = str(build_tiny_model(arch))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    results = {}
    for use in (True, False):
        monkeypatch.setattr(pdl, "ENV", use)
        llm = LLM(model=path, dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3,
                  num_scheduler_steps=4)
        results[use] = [[(list(o.outputs[0].token_ids),
                          [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
                         for o in llm.generate(prompt_token_ids=batch, sampling_params=params,
                                               use_tqdm=False)]
                        for batch in ([_prompts()[0]], _prompts())]
        del llm
        torch.cuda.empty_cache()
    assert results[True] == results[False]
