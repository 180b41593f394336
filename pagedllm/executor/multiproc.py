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

import gc
import os
import pickle
import time
import traceback
import weakref
from multiprocessing import connection as mp_connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.distributed import ShmComm, destroy_distributed, free_port, init_distributed

_STARTUP_TIMEOUT_S = 300.0


def _backend(config) -> str:
    return "nccl" if torch.device(config.device.device).type == "cuda" else "gloo"


def _threads_per_rank(tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp)


def _worker_main(config, rank: int, world: int, init_method: str, shm_paths, conn) -> None:
    from pagedllm.worker.worker import Worker
    try:
        conn.send(("hello", None))  # started: rank 0 may now join the group
        torch.set_num_threads(_threads_per_rank(world))
        init_distributed(world, rank, init_method, _backend(config), timeout_s=_STARTUP_TIMEOUT_S,
                         shm_paths=shm_paths, pp_size=config.parallel.pipeline_parallel_size)
        worker = Worker(config)
        conn.send(("ready", None))
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:  # the engine process is gone
                return
            if kind == "step":
                worker.execute_model(payload)
            elif kind == "launch":
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


def check_no_running_group() -> None:
    """One parallel engine per process: ``torch.distributed`` holds one default group."""
    if dist.is_initialized():
        gc.collect()  # an unreferenced earlier engine shuts its executor down when collected
    if dist.is_initialized():
        raise RuntimeError("a parallel engine is already running in this process; call its "
                           "executor's shutdown() first")


def shm_files(config) -> list[str] | None:
    """One shared-memory file per pipeline stage for the CPU tensor-parallel collectives
    (None on CUDA, at tp=1 or with --disable-custom-all-reduce); the caller unlinks them."""
    pc = config.parallel
    if (_backend(config) != "gloo" or pc.tensor_parallel_size == 1
            or pc.disable_custom_all_reduce):
        return None
    return [ShmComm.create_file(pc.tensor_parallel_size)
            for _ in range(pc.pipeline_parallel_size)]


def param_numel(worker) -> int:
    """Number of parameter elements this rank holds (for the shard tests)."""
    return sum(p.numel() for p in worker.model.parameters())


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


def release_rank0(threads: int, shm_paths) -> None:
    """What rank 0 undoes at shutdown whatever the executor: the process group, its torch
    thread count, the shared-memory files."""
    destroy_distributed()
    torch.set_num_threads(threads)
    for path in shm_paths or ():
        if os.path.exists(path):
            os.unlink(path)


class ParallelExecutor:
    """What the mp and Ray executors share: the start-up checks, the pickled step and
    failing for good once a worker died or raised. ``workers`` names them in messages."""

    workers = "parallel workers"

    def _start(self, config) -> int:
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

    # a step goes to every rank as one message: ("step", so) runs it whole; ("launch", so)
    # and ("finish", None) run its halves (pipeline micro-batches, see ModelRunner)
    def execute_model(self, scheduler_output):
        return self._run(("step", scheduler_output),
                         lambda: self.driver_worker.execute_model(scheduler_output))

    def launch(self, scheduler_output) -> None:
        """First half of a step on every rank (pipeline micro-batches, see ModelRunner)."""
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


class MultiprocExecutor(ParallelExecutor):
    def __init__(self, config) -> None:
        from pagedllm.worker.worker import Worker
        world = self._start(config)  # fail before starting processes
        pp = config.parallel.pipeline_parallel_size
        if _backend(config) == "nccl":
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
            torch.set_num_threads(_threads_per_rank(world))
            init_distributed(world, 0, init_method, _backend(config),
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
