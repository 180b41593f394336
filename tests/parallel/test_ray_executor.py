"""The Ray executor (``--distributed-executor-backend ray``) on CPU: ranks 1.. in Ray actors
placed by a placement group, gloo collectives as with mp. One local Ray cluster serves the
module (``ray.init`` costs seconds); the executor joins it."""
from __future__ import annotations

import logging
import os
import time

import pytest

ray = pytest.importorskip("ray")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.executor.multiproc import param_numel  # noqa: E402
from pagedllm.executor.ray_executor import RayExecutor  # noqa: E402
from tests.parallel.shards import expected_numels  # noqa: E402
from tests.utils.tiny_models import build_tiny_model  # noqa: E402

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(num_gpu_blocks_override=64, max_model_len=256)


# a stand-in for nsys: logs its arguments, skips "profile" and its options, runs the command
FAKE_NSYS = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls.log"
shift
while [ $# -gt 0 ]; do
  case "$1" in
    -t|-o) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
exec "$@"
"""


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The module's cluster; its processes see the stand-in nsys (yielded: its folder) on
    PATH, as a node with Nsight Systems installed would."""
    bin_dir = tmp_path_factory.mktemp("nsys-bin")
    (bin_dir / "nsys").write_text(FAKE_NSYS)
    (bin_dir / "nsys").chmod(0o755)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    try:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 << 20,
                 log_to_driver=False)
    finally:
        os.environ["PATH"] = path
    yield bin_dir
    ray.shutdown()


def _generate(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_ray_tp_and_pp_greedy_tokens_equal_one_rank(ray_cluster, caplog):
    path = build_tiny_model("qwen2")
    llm = LLM(model=str(path), **ENGINE)
    ref, (full,) = _generate(llm), llm.llm_engine.executor.collective_rpc(param_numel)
    del llm
    # the deprecated alias warns and selects ray
    with caplog.at_level(logging.WARNING):
        llm = LLM(model=str(path), tensor_parallel_size=2, worker_use_ray=True, **ENGINE)
    assert "--worker-use-ray is deprecated" in caplog.text
    executor = llm.llm_engine.executor
    try:
        assert isinstance(executor, RayExecutor) and len(executor.actors) == 1
        assert _generate(llm) == ref
        numels = executor.collective_rpc(param_numel)
        assert numels[0] == numels[1] < full * 0.6  # each rank holds half of the shards
        assert executor.broadcast_stats["bytes"] / executor.broadcast_stats["steps"] < 4096
    finally:
        executor.shutdown()
    llm = LLM(model=str(path), tensor_parallel_size=2, pipeline_parallel_size=2,
              distributed_executor_backend="ray", **ENGINE)
    try:
        assert _generate(llm) == ref
        assert llm.llm_engine.executor.collective_rpc(param_numel) == expected_numels(path, 2, 2)
    finally:
        llm.llm_engine.executor.shutdown()


def test_ray_workers_use_nsight(ray_cluster, monkeypatch):
    """--ray-workers-use-nsight: the actor's process starts under `nsys profile` with the
    runtime_env's options (and still computes the same tokens)."""
    monkeypatch.setenv("PATH", f"{ray_cluster}{os.pathsep}{os.environ['PATH']}")
    path = build_tiny_model("llama")
    llm = LLM(model=str(path), **ENGINE)
    ref = _generate(llm, PROMPTS[:2])
    del llm
    llm = LLM(model=str(path), tensor_parallel_size=2, distributed_executor_backend="ray",
              ray_workers_use_nsight=True, **ENGINE)
    try:
        assert _generate(llm, PROMPTS[:2]) == ref
    finally:
        llm.llm_engine.executor.shutdown()
    calls = (ray_cluster / "calls.log").read_text().splitlines()
    launches = [c for c in calls if "default_worker.py" in c]
    assert launches, calls
    for call in launches:  # profile, the options in some order, then python default_worker.py
        args = call.split()
        assert args[0] == "profile" and "--cuda-graph-trace=node" in args[1:6], call
        assert args[args.index("-t") + 1] == "cuda,cudnn,cublas", call
        assert args[args.index("-o") + 1].endswith("/logs/nsight/worker_process_%p"), call
        assert args[6] == "python" and args[7].endswith("default_worker.py"), call


def test_ray_killed_actor_ends_engine_with_clear_error(ray_cluster):
    path = build_tiny_model("llama")
    llm = LLM(model=str(path), tensor_parallel_size=2, distributed_executor_backend="ray",
              **ENGINE)
    executor = llm.llm_engine.executor
    try:
        _generate(llm, PROMPTS[:1])
        assert executor.healthy
        ray.kill(executor.actors[0])
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"Ray worker rank 1 .*died"):
            _generate(llm)
        assert time.monotonic() - start < 15
        assert not executor.healthy
        with pytest.raises(RuntimeError, match="failed earlier"):
            llm.llm_engine.step()
    finally:
        executor.shutdown()


def test_ray_tokenizer_pool_equals_in_process_tokenizer(ray_cluster):
    """--tokenizer-pool-size 2: LLM.generate (blocking encode) and the async engine
    (awaited encode) tokenize in the Ray actors, with the in-process tokenizer's ids."""
    import asyncio
    from pagedllm.engine.async_engine import AsyncLLMEngine
    path = build_tiny_model("llama")
    prompts = PROMPTS + ["Unicode: héllo wörld ✓ 日本", "  leading spaces\nand\ttabs"]
    llm = LLM(model=str(path), tokenizer_pool_size=2, tokenizer_pool_type="ray", **ENGINE)
    pool = llm.llm_engine.inputs.pool
    expected = [llm.get_tokenizer().encode(p) for p in prompts]
    one = SamplingParams(max_tokens=1)
    outs = llm.generate(prompts, one, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == expected
    assert pool.num_calls == [3, 3]  # spread over both actors

    async def generate_all():
        engine = AsyncLLMEngine(llm.llm_engine, log_requests=False)
        try:
            async def one_request(i, prompt):
                return [o async for o in engine.generate(prompt, one, f"r{i}")][-1]
            return await asyncio.gather(*(one_request(i, p) for i, p in enumerate(prompts)))
        finally:
            engine.shutdown()

    def blocking_encode(text):
        raise AssertionError("the async engine must not tokenize in the engine thread")

    pool.encode = blocking_encode
    outs = asyncio.run(generate_all())
    assert [o.prompt_token_ids for o in outs] == expected
    assert sum(pool.num_calls) == 2 * len(prompts) and min(pool.num_calls) > 3
    pool.shutdown()
    with pytest.raises(ValueError, match="--tokenizer-pool-extra-config"):
        LLM(model=str(path), tokenizer_pool_extra_config={"num_cpus": 0}, **ENGINE)
