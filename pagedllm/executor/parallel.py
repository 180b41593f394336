"""What the parallel executors (``multiproc.py``: local processes, ``ray_executor.py``: Ray
actors) share: the checks run before any rank starts, the collective backend and thread count
of a rank, the shared-memory files of the CPU collectives, rank 0's release at shutdown, and
``ParallelExecutor``, the base that sends each step (or its launch / finish halves) to every
rank and fails for good once a worker died or raised."""
from __future__ import annotations

import gc
import os
import pickle
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pagedllm.distributed import ShmComm, destroy_distributed
from pagedllm.executor.base import Executor

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


def collective_backend(config: EngineConfig) -> str:
    """The torch.distributed backend of the ranks: NCCL on CUDA, gloo on CPU."""
    return "nccl" if torch.device(config.device.device).type == "cuda" else "gloo"


def threads_per_rank(tp: int) -> int:
    """Torch threads of each local rank: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // tp)


def _require_model_support(hf_config, capability: str, flag: str) -> None:
    from pagedllm.models.registry import require_support, resolve_model_class
    require_support(resolve_model_class(getattr(hf_config, "architectures", None)),
                    capability, flag)


def check_pipeline_parallel(hf_config, pp: int) -> None:
    if pp == 1:
        return
    _require_model_support(hf_config, "pipeline_parallel", "--pipeline-parallel-size")
    if hf_config.num_hidden_layers < pp:
        raise ValueError(f"--pipeline-parallel-size {pp} exceeds the model's "
                         f"{hf_config.num_hidden_layers} layers")


def check_tensor_parallel(hf_config, tp: int) -> None:
    """Errors the ranks would hit while building the model, raised up front."""
    if tp == 1:
        return
    _require_model_support(hf_config, "tensor_parallel", "--tensor-parallel-size")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp or (kv_heads % tp and tp % kv_heads):
        raise ValueError(f"--tensor-parallel-size {tp} must divide the model's "
                         f"{heads} attention heads, and divide or be a multiple of its "
                         f"{kv_heads} KV heads")


def check_no_running_group() -> None:
    """One parallel engine per process: ``torch.distributed`` holds one default group."""
    if dist.is_initialized():
        gc.collect()  # an unreferenced earlier engine shuts its executor down when collected
    if dist.is_initialized():
        raise RuntimeError("a parallel engine is already running in this process; call its "
                           "executor's shutdown() first")


def shm_files(config: EngineConfig) -> list[str] | None:
    """One shared-memory file per pipeline stage for the CPU tensor-parallel collectives
    (None on CUDA, at tp=1 or with --disable-custom-all-reduce); the caller unlinks them."""
    pc = config.parallel
    if (collective_backend(config) != "gloo" or pc.tensor_parallel_size == 1
            or pc.disable_custom_all_reduce):
        return None
    return [ShmComm.create_file(pc.tensor_parallel_size)
            for _ in range(pc.pipeline_parallel_size)]


def param_numel(worker) -> int:
    """Number of parameter elements this rank holds (for the shard tests)."""
    return sum(p.numel() for p in worker.model.parameters())


def release_rank0(threads: int, shm_paths) -> None:
    """What rank 0 undoes at shutdown whatever the executor: the process group, its torch
    thread count, the shared-memory files."""
    destroy_distributed()
    torch.set_num_threads(threads)
    for path in shm_paths or ():
        if os.path.exists(path):
            os.unlink(path)


class ParallelExecutor(Executor):
    """What the mp and Ray executors share: the start-up checks, the pickled step and
    failing for good once a worker died or raised. ``workers`` names them in messages."""

    workers = "parallel workers"

    def _start(self, config: EngineConfig) -> int:
        """Checks run before any worker starts; returns the world size (tp x pp)."""
        check_no_running_group()
        tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        check_tensor_parallel(config.model.hf_config, tp)
        check_pipeline_parallel(config.model.hf_config, pp)
        self.world = tp * pp
        self.broadcast_stats = {"steps": 0, "bytes": 0, "seconds": 0.0}
        self._error: str | None = None
        return self.world

    def _pickle(self, message) -> bytes:
        try:
            return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            self._fail(f"the step could not be sent to the {self.workers} ({e}); with "
                       "several ranks requests must be picklable (e.g. "
                       "logits_processors defined at module level, not lambdas)", e)

    def _count_broadcast(self, num_bytes: int, t0: float) -> None:
        self.broadcast_stats["steps"] += 1
        self.broadcast_stats["bytes"] += num_bytes
        self.broadcast_stats["seconds"] += time.perf_counter() - t0

    def _fail(self, message: str, cause: BaseException | None = None):
        message += "; the engine cannot continue (restart it)"
        self._error = message
        self.shutdown()
        raise RuntimeError(message) from cause

    def _check_failed_earlier(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine's {self.workers} failed earlier: {self._error}")

    # a step goes to every rank as two messages: ("launch", so) and later ("finish", None),
    # its halves (the engine core's in-flight queue of batches, see ModelRunner)
    def launch(self, scheduler_output) -> None:
        """First half of a step on every rank (see ModelRunner)."""
        self._run(("launch", scheduler_output),
                  lambda: self.driver_worker.launch(scheduler_output))

    def finish(self):
        """Second half of the oldest launched step on every rank; rank 0's output."""
        return self._run(("finish", None), self.driver_worker.finish)

    def _run(self, message, on_driver):
        """Send ``message`` to the workers, run ``on_driver()`` on rank 0; a failure that a
        worker caused fails the engine for good, naming the worker."""
        self._check()
        try:
            self._broadcast(message)
            return on_driver()
        except (RuntimeError, OSError) as e:
            if self._error is not None:  # already diagnosed (e.g. an unpicklable step)
                raise
            err = self._failed_workers()
            if err is None:
                raise
            self._fail(err, e)

    def _broadcast(self, message) -> None:
        raise NotImplementedError

    def _failed_workers(self) -> str | None:
        """After a failed step: a message naming the workers that died or raised."""
        raise NotImplementedError

    def shutdown(self) -> None:
        self._finalizer()
