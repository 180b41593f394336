"""--ray-workers-use-nsight without Ray or GPUs: the start-up errors and the actor options
(the Ray runtime_env that runs each worker under ``nsys profile``). test_ray_executor.py
runs the workers under a stand-in nsys."""
from __future__ import annotations

import os
import sys

import pytest

from pagedllm import LLM
from pagedllm.ray_utils import NSIGHT_OPTIONS, ray_worker_options
from tests.utils.tiny_models import build_tiny_model

# gloo ranks on CPU on any host (a one-GPU host refuses two CUDA ranks: check_gpu_per_rank)
ENGINE = dict(device="cpu", num_gpu_blocks_override=64, max_model_len=256)


@pytest.mark.parametrize("flags, what", [
    (dict(), "this engine would run one process"),
    (dict(tensor_parallel_size=2), "the mp executor"),
    (dict(pipeline_parallel_size=2, distributed_executor_backend="mp"), "the mp executor")])
def test_nsight_needs_the_ray_executor(flags, what):
    with pytest.raises(ValueError, match=r"--ray-workers-use-nsight .*needs "
                                         r"--distributed-executor-backend ray .*" + what):
        LLM(model=str(build_tiny_model("llama")), ray_workers_use_nsight=True, **flags,
            **ENGINE)


def test_nsight_needs_nsys_on_path(monkeypatch, tmp_path):
    pytest.importorskip("ray")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nsys there; fails before Ray starts
    with pytest.raises(ValueError, match="--ray-workers-use-nsight .*nsys is not on PATH"):
        LLM(model=str(build_tiny_model("llama")), tensor_parallel_size=2,
            distributed_executor_backend="ray", ray_workers_use_nsight=True, **ENGINE)


def test_nsight_runtime_env_of_the_ray_workers():
    assert ray_worker_options(False) == {"num_cpus": 1}
    options = ray_worker_options(True)
    assert options["num_cpus"] == 1
    runtime_env = options["runtime_env"]
    # vLLM's nsys options: CUDA/cuDNN/cuBLAS traces, a report per worker pid, graph nodes
    assert runtime_env["nsight"] == {"t": "cuda,cudnn,cublas", "o": "'worker_process_%p'",
                                     "cuda-graph-trace": "node"} == NSIGHT_OPTIONS
    assert runtime_env["nsight"] is not NSIGHT_OPTIONS  # Ray rewrites "o" in place
    # Ray starts the worker as "nsys profile ... python": this interpreter's folder first
    path = runtime_env["env_vars"]["PATH"]
    assert path.split(os.pathsep) == [os.path.dirname(sys.executable), "${PATH}"]
    ray = pytest.importorskip("ray")
    parsed = ray.runtime_env.RuntimeEnv(**runtime_env)  # what Ray does with the options
    assert parsed.nsight() == NSIGHT_OPTIONS and parsed.env_vars()["PATH"] == path


def test_gpu_bundles_and_rank0_device():
    """On CUDA every rank's bundle and actor hold one GPU; rank 0 (outside Ray) binds the
    GPU Ray reserved for bundle 0, as indexed among the GPUs its process sees."""
    from pagedllm.ray_utils import driver_device_index, rank_bundle
    assert rank_bundle(False) == {"CPU": 1.0}
    assert rank_bundle(True) == {"CPU": 1.0, "GPU": 1.0}
    assert ray_worker_options(False, use_gpu=True) == {"num_cpus": 1, "num_gpus": 1}
    assert driver_device_index([3], None) == 3
    assert driver_device_index(["5"], "4,5,6") == 1
    with pytest.raises(ValueError, match="Ray reserved GPU 2 for rank 0.*=0,1"):
        driver_device_index([2], "0,1")
