"""Tensor x pipeline parallelism (tp=2 x pp=2 = 4 ranks, mp executor, gloo on CPU): tensor
groups inside each stage, hidden states sent stage to stage; greedy tokens equal one rank's
and each rank holds exactly its shard of its stage's layers. Ranks load in turns of
--max-parallel-loading-workers."""
from __future__ import annotations

import os
import re

from pagedllm import LLM, SamplingParams
from pagedllm.executor.multiproc import param_numel
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(num_gpu_blocks_override=64, max_model_len=256, enable_chunked_prefill=True,
              max_num_batched_tokens=8, max_num_seqs=4)


def load_window(worker):
    return worker.load_window


def _run(path, tp: int, pp: int, **flags):
    llm = LLM(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE,
              **flags)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        numels = llm.llm_engine.executor.collective_rpc(param_numel)
        windows = llm.llm_engine.executor.collective_rpc(load_window)
    finally:
        llm.llm_engine.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs], numels, windows


def expected_numels(path, tp: int, pp: int, num_layers: int = 2) -> list[int]:
    """Per global rank (``pp_rank * tp + tp_rank``): the checkpoint tensors of its stage,
    norms whole, everything else 1/tp (the tied last stage keeps its own embedding)."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(path, "model.safetensors"))
    tied = "lm_head.weight" not in state
    per_stage = [0] * pp
    for name, t in state.items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            stages = [int(layer.group(1)) * pp // num_layers]
        elif "embed_tokens" in name:
            stages = sorted({0, pp - 1}) if tied else [0]
        else:  # final norm, LM head
            stages = [pp - 1]
        for s in stages:
            per_stage[s] += t.numel() if "norm" in name else t.numel() // tp
    return [per_stage[r // tp] for r in range(tp * pp)]


def test_tp2_pp2_greedy_tokens_equal_one_rank_and_ranks_hold_their_shards():
    """(The tied-embedding Qwen2 runs tp=2 x pp=2 in test_ray_executor.py.)"""
    path = build_tiny_model("llama")
    ref, (full,), _ = _run(path, 1, 1)
    assert [full] == expected_numels(path, 1, 1)  # the oracle counts what one rank holds
    tokens, numels, windows = _run(path, 2, 2, max_parallel_loading_workers=2)
    assert tokens == ref
    assert numels == expected_numels(path, 2, 2)
    # --max-parallel-loading-workers 2: ranks 2, 3 start loading after ranks 0, 1 finished
    assert max(end for _, end in windows[:2]) <= min(start for start, _ in windows[2:])
