"""Pipeline parallelism (pp=2, mp executor, gloo on CPU): contiguous layer ranges per stage,
hidden states sent between stages; greedy tokens equal one stage's, each stage holds only
its layers' weights and only its layers' KV cache."""
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


def _run(path, pp: int):
    llm = LLM(model=str(path), pipeline_parallel_size=pp, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        numels = llm.llm_engine.executor.collective_rpc(param_numel)
        kv = llm.llm_engine.executor.collective_rpc(kv_cache_layout)
    finally:
        llm.llm_engine.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs], numels, kv


# llama, opt-untied: untied LM head; the others tie it (the last stage keeps its own
# embedding copy); opt-untied projects in on the first stage and out on the last; opt and
# gpt2 pass only hidden states between stages, the rest hidden states and residual
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "opt-untied", "gpt2", "gemma",
                                  "gemma2"])
def test_pp2_greedy_tokens_equal_pp1_and_stages_hold_their_layers(arch):
    path = build_tiny_model(arch)
    ref, numels1, ((layers1, bytes1, block1, shape1),) = _run(path, 1)
    assert numels1 == expected_numels(path, 1, 1)  # the oracle counts what one rank holds
    tokens, numels, kvs = _run(path, 2)
    assert tokens == ref
    assert numels == expected_numels(path, 1, 2)
    # each stage caches its own layer only: half the bytes per block and in all
    assert layers1 == [0, 1]
    assert [kv[0] for kv in kvs] == [[0], [1]]
    assert [kv[1:] for kv in kvs] == [(bytes1 // 2, block1 // 2, shape1)] * 2


def test_pp_unsupported_fails_at_start_up(monkeypatch):
    from pagedllm.models.opt import OPTForCausalLM
    monkeypatch.setattr(OPTForCausalLM, "supports_pipeline_parallel", False)
    with pytest.raises(ValueError, match=r"OPTForCausalLM does not support "
                                         r"--pipeline-parallel-size > 1 .*supported: .*Gemma"):
        LLM(model=str(build_tiny_model("opt")), pipeline_parallel_size=2, **ENGINE)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        LLM(model=str(build_tiny_model("llama")), pipeline_parallel_size=3, **ENGINE)


def test_uneven_stages_and_a_stage_cache(monkeypatch):
    """8 layers over 3 stages: 3, 3, 2 (earlier stages take the remainder); a stage's
    CacheEngine holds, copies and swaps only its layers, found by their model index."""
    import torch
    from pagedllm import distributed
    from pagedllm.attention.cache_spec import KVCacheSpec
    from pagedllm.worker.cache_engine import CacheEngine
    monkeypatch.setattr(distributed.STATE, "pp_size", 3)
    ranges = []
    for rank in range(3):
        monkeypatch.setattr(distributed.STATE, "pp_rank", rank)
        ranges.append(distributed.stage_layers(8))
    assert ranges == [range(0, 3), range(3, 6), range(6, 8)]
    block_size, num_kv_heads, head_dim = 4, 2, 8
    spec = KVCacheSpec(2, num_kv_heads, head_dim)
    cache = CacheEngine(ranges[1], spec, block_size, num_gpu_blocks=4,
                        num_cpu_blocks=2, dtype=torch.float32, device=torch.device("cpu"))
    assert sorted(cache.gpu_cache) == [3, 4, 5]
    assert sum(t.numel() * 4 for t in cache.gpu_cache.values()) == \
        4 * spec.bytes_per_block(3, block_size, torch.float32)
    for i, t in cache.gpu_cache.items():
        t[:, :block_size] = i  # block 0 of layer i holds i
    cache.swap_out([(0, 1)])
    cache.swap_in([(1, 2)])
    cache.copy_blocks([(2, 3)])
    assert sorted(cache.cpu_cache) == [3, 4, 5]
    for i, t in cache.gpu_cache.items():
        blocks = t.view(2, 4, block_size, num_kv_heads, head_dim)
        assert (blocks[:, [0, 2, 3]] == i).all() and (blocks[:, 1] == 0).all()


def test_micro_batches_in_flight_give_the_same_outputs():
    """pp=2 keeps two micro-batches of disjoint requests in flight (stage 0 runs the next
    while stage 1 runs this one); greedy and seeded tokens, stop strings and aborts behave
    as with one stage, and no block is left behind."""
    path = str(build_tiny_model("llama"))
    prompts = PROMPTS + ["while True:", "print(", "return x"]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True)]
    engine = dict(ENGINE, max_num_seqs=8)

    def run(pp):
        llm = LLM(model=path, pipeline_parallel_size=pp, **engine)
        eng = llm.llm_engine
        depths, launch = [], eng.executor.launch

        def spy(so):
            launch(so)
            depths.append(sum(not s.is_empty for s in eng.core._in_flight)
                          + (not so.is_empty))
        eng.executor.launch = spy
        try:
            outs = [[o.outputs[0] for o in llm.generate(prompts, p, use_tqdm=False)]
                    for p in params]
            stop = [o.text[3:6] for o in outs[0] if len(o.text) > 6]
            stopped = llm.generate(prompts, SamplingParams(
                temperature=0, max_tokens=10, ignore_eos=True, stop=stop), use_tqdm=False)
            outs.append([o.outputs[0] for o in stopped])
            eng.add_request("gone", prompts[0], params[0])  # aborted after two steps
            eng.add_request("kept", prompts[1], params[0])
            eng.step(), eng.step()
            eng.abort_request("gone")
            while eng.has_unfinished_requests():
                eng.step()
            kv = eng.kv_cache_manager
            assert kv.num_free_blocks == kv.pool.num_blocks and not eng.scheduler.in_flight
        finally:
            eng.executor.shutdown()
        return [[(c.token_ids, c.text, c.finish_reason) for c in o] for o in outs], depths

    want, _ = run(1)
    got, depths = run(2)
    assert got == want
    assert any(c[2] == "stop" for c in got[2])
    assert max(depths) == 2  # two non-empty batches were in flight at once


def test_multi_step_batches_over_stages():
    """--num-scheduler-steps 4 at pp=2: each of a batch's steps sends its hidden states on
    (the forward's ForwardContext.sends, kept with the step and awaited when it is sampled);
    greedy tokens equal one stage's."""
    path = str(build_tiny_model("llama"))
    engine = dict(ENGINE, num_scheduler_steps=4, enable_chunked_prefill=False,
                  max_num_batched_tokens=256)
    tokens = []
    for pp in (1, 2):
        llm = LLM(model=path, pipeline_parallel_size=pp, **engine)
        try:
            tokens.append([o.outputs[0].token_ids
                           for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)])
        finally:
            llm.llm_engine.executor.shutdown()
    assert tokens[0] == tokens[1]
