"""Executors: what the engine calls to run a step on one or several devices.

- ``UniProcExecutor``: today's single ``Worker`` in the engine process.
- ``MultiprocExecutor`` (``--distributed-executor-backend mp``): rank 0 (tensor-parallel
  rank 0, or the first pipeline stage) in the engine process, ranks 1.. in spawned worker
  processes.

Both offer ``driver_worker``, ``num_gpu_blocks``, ``num_cpu_blocks``,
``execute_model(scheduler_output)``, ``collective_rpc(fn)`` and ``shutdown()``.
"""
from __future__ import annotations


def make_executor(config):
    pc = config.parallel
    if pc.pipeline_parallel_size > 1 and pc.tensor_parallel_size > 1:
        raise ValueError("--pipeline-parallel-size > 1 together with --tensor-parallel-size "
                         "> 1 is not supported yet (issue #7); use one of them")
    if pc.distributed_executor_backend == "ray" or pc.worker_use_ray:
        raise ValueError("--distributed-executor-backend ray is not supported yet (issue #7); "
                         "supported: mp")
    loading = config.load.max_parallel_loading_workers if hasattr(config, "load") else None
    if loading is not None and loading < pc.world_size:
        raise ValueError(f"--max-parallel-loading-workers {loading} below the "
                         f"{pc.world_size} ranks is not supported yet (issue #7): every rank "
                         "loads its shard at once")
    if pc.world_size == 1:
        from pagedllm.executor.uniproc import UniProcExecutor
        return UniProcExecutor(config)
    from pagedllm.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config)
