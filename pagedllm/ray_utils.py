"""Connecting to Ray (shared by the Ray executor and the Ray tokenizer pool) and the Ray
workers' actor options, Nsight Systems profiling included (``--ray-workers-use-nsight``)."""
from __future__ import annotations

import logging
import os
import shutil
import sys

logger = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 128 << 20  # small messages travel inline; the store holds almost nothing


def connect_ray(min_cpus: int = 1) -> None:
    """Join the running Ray cluster (``ray.init`` already called in this process, or
    ``RAY_ADDRESS`` set), else start a local one: dashboard off, a small object store and at
    least ``min_cpus`` logical CPUs. A cluster started here lives until the process exits."""
    import ray
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES)


# `nsys profile` options of each Ray worker under --ray-workers-use-nsight (Ray's runtime_env
# "nsight" turns {"t": v} into "-t v" and {"cuda-graph-trace": v} into "--cuda-graph-trace=v"):
# trace CUDA, cuDNN and cuBLAS calls, one report per worker process (%p: its pid; the quotes
# survive the shell command Ray builds), CUDA graphs traced node by node.
NSIGHT_OPTIONS = {"t": "cuda,cudnn,cublas", "o": "'worker_process_%p'",
                  "cuda-graph-trace": "node"}


def check_nsight(backend: str) -> None:
    """--ray-workers-use-nsight needs the Ray executor and ``nsys`` on PATH (start-up check;
    ``backend`` is the resolved executor: uni, mp or ray)."""
    if backend != "ray":
        what = "one process" if backend == "uni" else f"the {backend} executor"
        raise ValueError("--ray-workers-use-nsight profiles the Ray workers, so it needs "
                         f"--distributed-executor-backend ray (this engine would run {what}); "
                         "pass --distributed-executor-backend ray or remove the flag")
    if shutil.which("nsys") is None:
        raise ValueError("--ray-workers-use-nsight runs each Ray worker under NVIDIA Nsight "
                         "Systems, but nsys is not on PATH; install Nsight Systems (or add "
                         "its bin folder to PATH) or remove the flag")


def ray_worker_options(use_nsight: bool, use_gpu: bool = False) -> dict:
    """``ray.remote`` options of the worker actors: one CPU each (and one GPU on CUDA: Ray
    then sets the actor's CUDA_VISIBLE_DEVICES to it) and, with nsight, a runtime_env that
    starts each actor's process under ``nsys profile`` (reports land in the Ray session's
    ``logs/nsight`` folder). Ray launches that process as ``nsys ... python``, so PATH puts
    this interpreter's folder first: ``python`` is then the one running the engine, with
    pagedllm installed."""
    options: dict = {"num_cpus": 1}
    if use_gpu:
        options["num_gpus"] = 1
    if use_nsight:
        bin_dir = os.path.dirname(sys.executable)
        options["runtime_env"] = {"nsight": dict(NSIGHT_OPTIONS),
                                  "env_vars": {"PATH": f"{bin_dir}{os.pathsep}${{PATH}}"}}
    return options


def rank_bundle(use_gpu: bool) -> dict:
    """The placement-group bundle of one rank."""
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


def driver_device_index(ray_gpu_ids: list, visible: str | None) -> int:
    """Rank 0 runs in the engine process, outside Ray's GPU assignment: the index, among
    the GPUs this process sees (``CUDA_VISIBLE_DEVICES``: ``visible``, None = all), of the
    GPU that Ray reserved for bundle 0 (``ray_gpu_ids``, Ray's ids of that bundle)."""
    gpu = str(ray_gpu_ids[0])
    if not visible:
        return int(gpu)
    ids = [v.strip() for v in visible.split(",")]
    if gpu not in ids:
        raise ValueError(f"Ray reserved GPU {gpu} for rank 0, but this process only sees "
                         f"CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(gpu)

