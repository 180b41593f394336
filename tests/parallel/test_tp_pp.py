"""Tensor x pipeline parallelism (tp=2 x pp=2 = 4 ranks, mp executor, gloo on CPU): tensor
groups inside each stage, hidden states sent stage to stage; greedy tokens equal one rank's
and each rank holds exactly its shard of its stage's layers. Ranks load in turns of
--max-parallel-loading-workers."""
from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.multiproc import param_numel
from tests.parallel.shards import expected_numels, kv_cache_layout
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# gloo ranks on CPU on any host (a one-GPU host refuses two CUDA ranks: check_gpu_per_rank)
ENGINE = dict(device="cpu", num_gpu_blocks_override=64, max_model_len=256,
              enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)


def load_window(worker):
    return worker.load_window


def _run(path, tp: int, pp: int, **flags):
    llm = LLM(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE,
              **flags)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        numels = llm.llm_engine.executor.collective_rpc(param_numel)
        windows = llm.llm_engine.executor.collective_rpc(load_window)
        kvs = llm.llm_engine.executor.collective_rpc(kv_cache_layout)
    finally:
        llm.llm_engine.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs], numels, windows, kvs


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tp2_pp2_greedy_tokens_equal_one_rank_and_ranks_hold_their_shards(arch):
    """llama: untied LM head; gemma2: tied (the last stage's embedding shards serve as the
    head), soft-capped logits. (Qwen2 runs tp=2 x pp=2 in test_ray_executor.py.)"""
    path = build_tiny_model(arch)
    ref, numels1, _, ((_, bytes1, _, shape1),) = _run(path, 1, 1)
    assert numels1 == expected_numels(path, 1, 1)  # the oracle counts what one rank holds
    tokens, numels, windows, kvs = _run(path, 2, 2, max_parallel_loading_workers=2)
    assert tokens == ref
    assert numels == expected_numels(path, 2, 2)
    # rank = stage x 2 + tensor rank: its stage's layer, half of the KV heads
    assert [kv[0] for kv in kvs] == [[0], [0], [1], [1]]
    assert all(kv[1] == bytes1 // 4 and kv[3][2] == shape1[2] // 2 for kv in kvs)
    # --max-parallel-loading-workers 2: ranks 2, 3 start loading after ranks 0, 1 finished
    assert max(end for _, end in windows[:2]) <= min(start for start, _ in windows[2:])
