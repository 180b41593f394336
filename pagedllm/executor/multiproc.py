"""Tensor and pipeline parallelism over local processes (``--distributed-executor-backend mp``).

Rank 0 lives in the engine process; ranks 1..tp*pp-1 are processes started with
``torch.multiprocessing``'s spawn context, each with a ``Worker`` holding its shard of its
stage's layers and its KV heads (rank layout: ``pagedllm.distributed``). Each step rank 0
pickles the ``SchedulerOutput`` once and writes the bytes to
every worker's pipe (measured in ``broadcast_stats``: 0.4-1.4 KB and 0.1-0.4 ms a step on
the tiny models), then runs its own worker; all ranks run the model (collectives over gloo
on CPU, NCCL on CUDA; on CPU small all-reduces and all-gathers go through shared memory,
``pagedllm.distributed.ShmComm``, unless ``--disable-custom-all-reduce``). Every rank gets
the same all-gathered logits and seeded generators, so each samples the same tokens and
keeps its per-request state in step without a token broadcast; only rank 0's output goes
back to the engine.

Failures: a worker that raises sends its traceback up its pipe and exits; a worker that
dies (killed) closes its sockets (gloo fails at once) and its pid turns zombie (the
shared-memory wait checks it every 0.1 s). Either way the step raises ``RuntimeError``
naming the rank and exit code, and every later step raises too. A worker that dies during
start-up is seen through its process sentinel, so start-up never waits on it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pickle
import time
import traceback
import weakref
from multiprocessing import connection as mp_connection

import torch
import torch.multiprocessing as mp

from pagedllm.distributed import destroy_distributed, free_port, init_distributed
from pagedllm.executor.parallel import (ParallelExecutor, collective_backend, release_rank0,
                                        shm_files, threads_per_rank)
from pagedllm.executor.parallel import param_numel  # noqa: F401 - where the tests import it

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

_STARTUP_TIMEOUT_S = 300.0


def _worker_main(config: EngineConfig, rank: int, world: int, init_method: str, shm_paths,
                 conn) -> None:
    from pagedllm.worker.worker import Worker
    try:
        conn.send(("hello", None))  # started: rank 0 may now join the group
        torch.set_num_threads(threads_per_rank(world))
        init_distributed(world, rank, init_method, collective_backend(config),
                         timeout_s=_STARTUP_TIMEOUT_S, shm_paths=shm_paths,
                         pp_size=config.parallel.pipeline_parallel_size)
        worker = Worker(config)
        conn.send(("ready", None))
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine process is gone
                return
            if kind == "launch":
                worker.launch(payload)
            elif kind == "finish":
                worker.finish()
            elif kind == "call":
                conn.send(("result", payload(worker)))
            else:  # "stop"
                return
    except BaseException:  # noqa: BLE001 - report anything to the engine, then exit
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        destroy_distributed()


def check_gpu_per_rank(tp: int, pp: int, visible_gpus: int) -> None:
    """With NCCL each rank binds its own GPU (``init_distributed``); more ranks than this
    host's visible GPUs would put two on one device, which NCCL refuses mid start-up."""
    ranks = tp * pp
    if ranks > visible_gpus:
        raise ValueError(
            f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} = {ranks} ranks need "
            f"{ranks} CUDA devices on this host (one per rank); {visible_gpus} visible "
            "(CUDA_VISIBLE_DEVICES). Use at most that many ranks, --distributed-executor-backend "
            "ray for a multi-host cluster, or --device cpu to run the ranks on CPU")


def _shutdown(procs, conns, threads: int, shm_paths) -> None:
    stop = pickle.dumps(("stop", None))
    for conn in conns:
        try:
            conn.send_bytes(stop)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1)
    for conn in conns:
        conn.close()
    release_rank0(threads, shm_paths)


class MultiprocExecutor(ParallelExecutor):
    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.worker.worker import Worker
        world = self._start(config)  # fail before starting processes
        pp = config.parallel.pipeline_parallel_size
        if collective_backend(config) == "nccl":
            check_gpu_per_rank(config.parallel.tensor_parallel_size, pp, torch.cuda.device_count())
        init_method = f"tcp://127.0.0.1:{free_port()}"
        shm_paths = shm_files(config)
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        old_threads = torch.get_num_threads()
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns, old_threads,
                                           shm_paths)
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main,
                               args=(config, rank, world, init_method, shm_paths, child),
                               name=f"pagedllm-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            self._expect("hello")  # a worker that dies before joining must not hang rank 0
            torch.set_num_threads(threads_per_rank(world))
            init_distributed(world, 0, init_method, collective_backend(config),
                             timeout_s=_STARTUP_TIMEOUT_S, shm_paths=shm_paths, pp_size=pp)
            self.driver_worker = Worker(config)
            self._expect("ready")
        except BaseException as e:
            err = self._worker_errors()
            self.shutdown()
            if err and isinstance(e, RuntimeError) and "worker rank" not in str(e):
                raise RuntimeError(err) from e  # a collective failed because a worker did
            raise
        self.num_gpu_blocks = self.driver_worker.num_gpu_blocks
        self.num_cpu_blocks = self.driver_worker.num_cpu_blocks

    def _expect(self, expected: str) -> None:
        """Wait for ``expected`` from every worker; raise if one reports an error or dies."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            ready = mp_connection.wait([conn, proc.sentinel], timeout=_STARTUP_TIMEOUT_S)
            if conn in ready:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "error", "(no traceback: the process exited)"
                if kind == expected:
                    continue
                proc.join(1)
                raise RuntimeError(f"parallel worker rank {rank} failed to start "
                                   f"(exit code {proc.exitcode}):\n{payload}")
            proc.join(1)
            raise RuntimeError(f"parallel worker rank {rank} (pid {proc.pid}) "
                               + (f"died during start-up (exit code {proc.exitcode})"
                                  if not proc.is_alive() else
                                  f"did not start within {_STARTUP_TIMEOUT_S:.0f} s"))

    # ---- health ----------------------------------------------------------------------------
    def _worker_errors(self) -> str | None:
        """A message naming the workers that died or raised, or None if all are running."""
        lines = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            tb = None
            try:
                while conn.poll():
                    kind, payload = conn.recv()
                    if kind == "error":
                        tb = payload
            except (EOFError, OSError):
                pass
            if tb is not None:
                lines.append(f"parallel worker rank {rank} raised:\n{tb}")
            elif not proc.is_alive():
                proc.join(0.1)
                lines.append(f"parallel worker rank {rank} (pid {proc.pid}) died "
                             f"(exit code {proc.exitcode})")
        return "\n".join(lines) or None

    @property
    def healthy(self) -> bool:
        """False once a worker died or raised (the server's /health reports it)."""
        return self._error is None and all(proc.is_alive() for proc in self.procs)

    def _check(self) -> None:
        self._check_failed_earlier()
        err = self._worker_errors()
        if err:
            self._fail(err)

    # ---- steps -----------------------------------------------------------------------------
    def _broadcast(self, message) -> None:
        t0 = time.perf_counter()
        data = self._pickle(message)
        for conn in self.conns:
            conn.send_bytes(data)
        self._count_broadcast(len(data), t0)

    def _failed_workers(self) -> str | None:
        time.sleep(0.2)  # let a dying worker's exit code / traceback arrive
        return self._worker_errors()

    def collective_rpc(self, fn) -> list:
        """Run ``fn(worker)`` on every rank (``fn`` must be picklable, i.e. module-level);
        returns the results in rank order. ``fn`` must not run collectives."""
        self._check()
        self._broadcast(("call", fn))
        results = [fn(self.driver_worker)]
        for rank, conn in enumerate(self.conns, start=1):
            kind, payload = conn.recv()
            if kind == "error":
                self._fail(f"parallel worker rank {rank} raised:\n{payload}")
            results.append(payload)
        return results
