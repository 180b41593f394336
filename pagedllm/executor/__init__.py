"""Executors: what the engine calls to run a step on one or several devices.

- ``UniProcExecutor``: a single ``Worker`` in the engine process (one device, default).
- ``MultiprocExecutor`` (``--distributed-executor-backend mp``, the default for several
  ranks): rank 0 in the engine process, ranks 1.. in spawned local processes.
- ``RayExecutor`` (``--distributed-executor-backend ray``, or the deprecated
  ``--worker-use-ray``): rank 0 in the engine process, ranks 1.. in Ray actors.

Ranks are ``tensor_parallel_size x pipeline_parallel_size``, laid out as documented in
``pagedllm.distributed``. All implement ``base.Executor`` (``driver_worker``,
``num_gpu_blocks``, ``num_cpu_blocks``, ``healthy``, ``launch`` / ``finish``,
``collective_rpc`` and ``shutdown``); the two parallel ones share
``parallel.ParallelExecutor`` and the helpers beside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import importlib.util

from pagedllm.ray_utils import check_nsight

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig
    from pagedllm.executor.base import Executor


def resolve_backend(pc) -> str:
    """``uni``, ``mp`` or ``ray`` from --distributed-executor-backend and --worker-use-ray;
    --ray-workers-use-nsight must come with ray (and nsys)."""
    backend = _backend_name(pc)
    if pc.ray_workers_use_nsight:
        check_nsight(backend)
    return backend


def _backend_name(pc) -> str:
    backend = pc.distributed_executor_backend
    if pc.worker_use_ray:
        if backend not in (None, "ray"):
            raise ValueError(f"--worker-use-ray cannot be combined with "
                             f"--distributed-executor-backend {backend}; use "
                             "--distributed-executor-backend ray alone")
        backend = "ray"
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("--distributed-executor-backend ray needs the ray package: "
                         "pip install 'pagedllm[ray]'")
    if backend is None:
        return "mp" if pc.world_size > 1 else "uni"
    if backend == "mp" and pc.world_size == 1:
        return "uni"  # one rank needs no process of its own
    return backend


def make_executor(config: EngineConfig) -> Executor:
    pc = config.parallel
    backend = resolve_backend(pc)
    if backend == "ray":
        from pagedllm.executor.ray_executor import RayExecutor
        return RayExecutor(config)
    if backend == "uni":
        from pagedllm.executor.uniproc import UniProcExecutor
        return UniProcExecutor(config)
    from pagedllm.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config)
