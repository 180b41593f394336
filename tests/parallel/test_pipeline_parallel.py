"""Pipeline parallelism (pp=2, mp executor, gloo on CPU): contiguous layer ranges per stage,
hidden states sent between stages; greedy tokens equal one stage's."""
from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.multiproc import param_numel
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(num_gpu_blocks_override=64, max_model_len=256, enable_chunked_prefill=True,
              max_num_batched_tokens=8, max_num_seqs=4)


def _run(path, pp: int):
    llm = LLM(model=str(path), pipeline_parallel_size=pp, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        numels = llm.llm_engine.executor.collective_rpc(param_numel)
    finally:
        llm.llm_engine.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs], numels


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied LM head
def test_pp2_greedy_tokens_equal_pp1_and_stages_hold_their_layers(arch):
    path = build_tiny_model(arch)
    ref, (full,) = _run(path, 1)
    tokens, numels = _run(path, 2)
    assert tokens == ref
    vocab_rows = 512 * 64  # the tied last stage keeps its own copy of the embedding
    assert sum(numels) == full + (vocab_rows if arch == "qwen2" else 0)
    assert max(numels) < full * 0.75


def test_pp_unsupported_fails_at_start_up():
    with pytest.raises(ValueError, match="does not support --pipeline-parallel-size"):
        LLM(model=str(build_tiny_model("opt")), pipeline_parallel_size=2, **ENGINE)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        LLM(model=str(build_tiny_model("llama")), pipeline_parallel_size=3, **ENGINE)
