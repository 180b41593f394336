"""Tensor parallelism with the mp executor on CPU (gloo): same greedy tokens as one rank,
shards only, and a dead worker ends the engine quickly with a clear error."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.multiproc import param_numel
from tests.parallel.shards import expected_numels
from tests.utils.tiny_models import build_tiny_model

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# gloo ranks on CPU on any host (a one-GPU host refuses two CUDA ranks: check_gpu_per_rank)
ENGINE = dict(device="cpu", num_gpu_blocks_override=64, max_model_len=256)


def _run(path, tp: int, prompts=PROMPTS, params=GREEDY, **flags):
    llm = LLM(model=str(path), tensor_parallel_size=tp, **ENGINE, **flags)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        numels = llm.llm_engine.executor.collective_rpc(param_numel)
        kv = llm.llm_engine.executor.collective_rpc(kv_cache_shape)
    finally:
        llm.llm_engine.executor.shutdown()
    return [o.outputs[0].token_ids for o in outs], numels, kv


def kv_cache_shape(worker):
    return tuple(worker.runner.cache.gpu_cache[0].shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2", "phi3", "gemma", "gemma2"])
def test_tp2_greedy_tokens_equal_tp1_and_ranks_hold_shards(arch):
    path = build_tiny_model(arch)
    ref, numels1, (kv1,) = _run(path, 1)
    assert numels1 == expected_numels(path, 1, 1)
    tokens, numels, kvs = _run(path, 2)
    assert tokens == ref
    # each rank holds half of every sharded tensor and all of the replicated ones
    assert numels == expected_numels(path, 2, 1)
    # each rank caches only its KV heads
    assert kvs == [kv1[:2] + (kv1[2] // 2,) + kv1[3:]] * 2


def test_tp2_library_all_reduce():
    """--disable-custom-all-reduce: every collective through gloo, same tokens."""
    path = build_tiny_model("llama")
    ref, _, _ = _run(path, 1, PROMPTS[:2])
    tokens, _, _ = _run(path, 2, PROMPTS[:2], disable_custom_all_reduce=True)
    assert tokens == ref


def test_tp4_replicates_kv_heads():
    """llama has 2 KV heads: at tp=4 each rank holds one (shared by two ranks)."""
    path = build_tiny_model("llama")
    ref, _, _ = _run(path, 1, PROMPTS[:2])
    tokens, numels, kvs = _run(path, 4, PROMPTS[:2])
    assert tokens == ref
    assert len(set(numels)) == 1 and all(shape[2] == 1 for shape in kvs)


def test_killed_worker_ends_engine_with_clear_error():
    path = build_tiny_model("llama")
    llm = LLM(model=str(path), tensor_parallel_size=2, **ENGINE)
    executor = llm.llm_engine.executor
    try:
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
        pid = executor.procs[0].pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 .*died"):
            for _ in range(100):  # ends long before: the worker dies 0.5 s in
                llm.generate(PROMPTS * 4, long, use_tqdm=False)
        assert time.monotonic() - start < 15
        assert not executor.healthy  # the server's /health turns 500
        with pytest.raises(RuntimeError, match="failed earlier"):
            llm.llm_engine.step()
    finally:
        executor.shutdown()


def test_unsupported_tp_fails_at_start_up(monkeypatch):
    from pagedllm.models.gemma import GemmaForCausalLM
    monkeypatch.setattr(GemmaForCausalLM, "supports_tensor_parallel", False)
    with pytest.raises(ValueError, match=r"GemmaForCausalLM does not support "
                                         r"--tensor-parallel-size > 1 .*supported: .*GPT2"):
        LLM(model=str(build_tiny_model("gemma")), tensor_parallel_size=2, **ENGINE)
    with pytest.raises(ValueError, match="must divide"):
        LLM(model=str(build_tiny_model("llama")), tensor_parallel_size=3, **ENGINE)
    for flags, name in [(dict(tensor_parallel_size=2, worker_use_ray=True,
                              distributed_executor_backend="mp"), "--worker-use-ray"),
                        (dict(ray_workers_use_nsight=True), "--ray-workers-use-nsight")]:
        with pytest.raises(ValueError, match=name):
            LLM(model=str(build_tiny_model("llama")), **flags, **ENGINE)


def test_more_ranks_than_gpus_fails_at_start_up_naming_the_flags(monkeypatch):
    """On CUDA the mp executor binds one GPU per rank: two ranks on one GPU must be a clear
    start-up error (NCCL would refuse them mid start-up), not a hang or an NCCL trace."""
    from pagedllm.executor import multiproc
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2 x --pipeline-parallel-size 1 "
                                         r"= 2 ranks need 2 CUDA devices .*; 1 visible"):
        multiproc.check_gpu_per_rank(2, 1, 1)
    with pytest.raises(ValueError, match=r"= 4 ranks need 4 .*--device cpu"):
        multiproc.check_gpu_per_rank(2, 2, 3)
    multiproc.check_gpu_per_rank(2, 2, 4)
    # the mp executor runs the check before it starts a process (here: NCCL and one GPU faked)
    monkeypatch.setattr(multiproc, "collective_backend", lambda config: "nccl")
    monkeypatch.setattr(multiproc.torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="2 ranks need 2 CUDA devices"):
        LLM(model=str(build_tiny_model("llama")), tensor_parallel_size=2, **ENGINE)


def test_tp2_features_same_outputs():
    """Chunked prefill, prefix caching, preemption (few blocks), seeded sampling and logprobs
    at tp=2 give tp=1's outputs: every rank samples the same tokens from the same logits."""
    path = build_tiny_model("qwen2")
    shared = "The for statement is used to iterate over the elements of a sequence " * 2
    prompts = [shared + "and", shared + "or", "def f(x):", "import os"]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             prompt_logprobs=1),
              SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=24, n=2,
                             ignore_eos=True)]
    flags = dict(device="cpu", enable_prefix_caching=True, enable_chunked_prefill=True,
                 max_num_batched_tokens=16, max_num_seqs=4, num_gpu_blocks_override=12,
                 max_model_len=256)

    def run(tp):
        llm = LLM(model=str(path), tensor_parallel_size=tp, **flags)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.llm_engine.executor.shutdown()
        return ([[c.token_ids for c in o.outputs] for o in outs],
                [sorted(lp) for lp in outs[0].outputs[0].logprobs],
                [sorted(lp) if lp else None for lp in outs[2].prompt_logprobs])

    assert run(2) == run(1)


def test_tp2_speculative_decoding_same_outputs():
    """Prompt-lookup speculation at tp=2: greedy tokens equal plain decoding's, and seeded
    sampled tokens equal speculation's at tp=1 (every rank verifies the same drafts with the
    same uniforms)."""
    path = build_tiny_model("llama")
    prompts = ["a b c a b c a b c a b", "x = 1\nx = 1\nx = 1\nx", "The for statement"]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    spec = dict(speculative_model="[ngram]", num_speculative_tokens=3,
                ngram_prompt_lookup_max=2)

    def run(tp, **flags):
        llm = LLM(model=str(path), tensor_parallel_size=tp, **ENGINE, **flags)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
            drafts = llm.llm_engine.scheduler.spec_draft_tokens_total
        finally:
            llm.llm_engine.executor.shutdown()
        return [list(o.outputs[0].token_ids) for o in outs], drafts

    (plain, _), (spec1, _), (spec2, drafts) = run(1), run(1, **spec), run(2, **spec)
    assert spec2 == spec1 and drafts > 0
    assert [spec2[0], spec2[2]] == [plain[0], plain[2]]
