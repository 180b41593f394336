"""Tensor and pipeline parallelism over Ray actors (``--distributed-executor-backend ray``).

Same shape as the mp executor (``multiproc.py``): rank 0's ``Worker`` runs in the engine
process, ranks 1..world-1 in ``RayWorker`` actors, and all ranks meet in one
``torch.distributed`` group (gloo on CPU) with the same worker code and collectives; on one
node the CPU tensor-parallel collectives use the same shared memory (``ShmComm``).

Start-up, in order:
1. cluster: join the running one when ``ray.is_initialized()`` or ``RAY_ADDRESS`` is set,
   else start a local one (dashboard off, small object store, at least one logical CPU per
   rank); a cluster started here lives until the process exits;
2. a placement group of one ``{"CPU": 1}`` bundle per rank (PACK: one node where it fits;
   the first bundle also asks for a sliver of the engine node's ``node:<ip>`` resource, so
   PACK starts on the engine's node); rank 0, in the engine process, takes a bundle that
   Ray placed on the engine's node (Ray may place the first bundle on another node with the
   same IP, e.g. two Ray nodes on one machine), the actors take the others in order;
3. every actor reports its node and pid; the rendezvous address is the engine's node IP
   (127.0.0.1 when all ranks share the node, which also enables the shared memory);
4. actors and rank 0 build their ``Worker`` together (they meet in collectives).

``--ray-workers-use-nsight`` starts every actor's process under ``nsys profile``
(``pagedllm.ray_utils.ray_worker_options``); rank 0 runs in the engine process, which Ray
does not start: profile it by running the engine itself under ``nsys profile``.

Each step the ``SchedulerOutput`` is pickled once and the same bytes go to every actor's
``execute_model`` (small: inlined in the task, no object-store round trip). Rank 0 does not
wait for the actors' replies (only its own output is needed; one caller's actor tasks run in
order); replies that have arrived are checked for errors before each step.

Failures: an actor whose step raises returns the traceback and exits a moment later, so the
collectives of the other ranks fail instead of waiting; a killed actor closes its sockets at
once (and the shared-memory wait sees its pid gone). The step then raises ``RuntimeError``
naming the rank, the actors are killed, and every later step raises too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import os
import pickle
import threading
import time
import weakref

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedllm.distributed import free_port, init_distributed, pid_alive
from pagedllm.executor.parallel import (ParallelExecutor, collective_backend, release_rank0,
                                        shm_files, threads_per_rank)
from pagedllm.ray_utils import (connect_ray, driver_device_index, rank_bundle,
                                 ray_worker_options)

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

_STARTUP_TIMEOUT_S = 300.0
_PLACEMENT_TIMEOUT_S = 60.0
_EXIT_DELAY_S = 0.5  # a failed actor lingers this long so that its traceback reaches rank 0
_SETTLE_S = 1.0  # after a rank's error, how long to look for the dead rank that caused it


class RayWorker:
    """One rank in a Ray actor (wrapped with ``ray.remote`` when the executor starts)."""

    def __init__(self) -> None:
        self.worker = None

    def where(self) -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), os.getpid()

    def init_worker(self, config: EngineConfig, rank: int, world: int, init_method: str,
                    shm_paths) -> None:
        from pagedllm.worker.worker import Worker
        try:
            torch.set_num_threads(threads_per_rank(world))
            init_distributed(world, rank, init_method, collective_backend(config),
                             timeout_s=_STARTUP_TIMEOUT_S, shm_paths=shm_paths,
                             pp_size=config.parallel.pipeline_parallel_size)
            self.worker = Worker(config)
        except BaseException:
            self._exit_soon()
            raise

    def execute_model(self, data: bytes) -> None:
        """One step message: ("launch", SchedulerOutput) or ("finish", None)."""
        try:
            kind, payload = pickle.loads(data)
            if kind == "launch":
                self.worker.launch(payload)
            else:
                self.worker.finish()
        except BaseException:
            self._exit_soon()
            raise

    def call(self, fn):
        return fn(self.worker)

    @staticmethod
    def _exit_soon() -> None:
        """Leave the group: the other ranks' collectives fail instead of hanging."""
        threading.Timer(_EXIT_DELAY_S, os._exit, (1,)).start()


def _placement_group(world: int, use_gpu: bool):
    bundle = rank_bundle(use_gpu)
    for resource in bundle:
        total = ray.cluster_resources().get(resource, 0)
        if total < world:
            raise ValueError(f"the Ray cluster has {total:g} {resource}s, fewer than the "
                             f"{world} ranks of --tensor-parallel-size x "
                             f"--pipeline-parallel-size (one bundle {bundle} per rank)")
    bundles = [dict(bundle) for _ in range(world)]
    node_ip = f"node:{ray.util.get_node_ip_address()}"
    if node_ip in ray.cluster_resources():  # start packing on the engine's node
        bundles[0][node_ip] = 0.001
    pg = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"the Ray cluster could not place {world} bundles {bundle} within "
                           f"{_PLACEMENT_TIMEOUT_S:.0f} s (available: "
                           f"{ray.available_resources()})")
    return pg


def _rank_bundles(pg, node_id: str) -> list[int]:
    """The bundle index of each rank: rank 0 (the engine process) gets a bundle on the
    engine's node ``node_id``, ranks 1.. the other bundles in order."""
    nodes = placement_group_table(pg)["bundles_to_node_id"]  # {bundle index: node id}
    local = [i for i in sorted(nodes) if nodes[i] == node_id]
    if not local:
        raise RuntimeError(f"Ray placed no bundle on the engine's node {node_id} (rank 0 "
                           f"runs in the engine process): start the engine on a node with a "
                           f"free CPU (and GPU on CUDA) for it; the bundles went to nodes "
                           f"{sorted(set(nodes.values()))}")
    return [local[0]] + [i for i in sorted(nodes) if i != local[0]]


def _shutdown(actors, pg, threads: int, shm_paths) -> None:
    if not ray.is_initialized():  # the cluster is gone (a Ray call would start a new one)
        actors, pg = (), None
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if pg is not None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - the cluster is gone (process exit)
            pass
    release_rank0(threads, shm_paths)


class RayExecutor(ParallelExecutor):
    workers = "Ray workers"

    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.worker.worker import Worker
        world = self._start(config)  # fail before starting actors
        self._pending: list = []  # [(rank, ObjectRef)] step replies not yet checked
        connect_ray(world)
        self.actors: list = []
        self.places: list[tuple[str, int]] = []  # (node id, pid) of ranks 1..
        self._node_id = ray.get_runtime_context().get_node_id()  # the engine's node
        self._shm_paths: list[str] = []
        old_threads = torch.get_num_threads()
        self._use_gpu = config.device.device == "cuda"
        self._pg = _placement_group(world, self._use_gpu)
        self._finalizer = weakref.finalize(self, _shutdown, self.actors, self._pg, old_threads,
                                           self._shm_paths)
        try:
            self._bundles = _rank_bundles(self._pg, self._node_id)  # bundle index of each rank
        except BaseException:
            self.shutdown()
            raise
        options = ray_worker_options(config.parallel.ray_workers_use_nsight, self._use_gpu)
        actor_class = ray.remote(**options)(RayWorker)
        try:
            for rank in range(1, world):
                strategy = PlacementGroupSchedulingStrategy(self._pg, self._bundles[rank])
                self.actors.append(actor_class.options(scheduling_strategy=strategy).remote())
            self.places = ray.get([a.where.remote() for a in self.actors],
                                  timeout=_STARTUP_TIMEOUT_S)  # [(node_id, pid)] of rank 1..
            self._start_workers(config, Worker)
        except BaseException as e:
            err = self._actor_errors(wait_s=2.0) if self.actors else None
            self.shutdown()
            if err:
                raise RuntimeError(f"the Ray workers failed to start:\n{err}") from e
            raise
        self.num_gpu_blocks = self.driver_worker.num_gpu_blocks
        self.num_cpu_blocks = self.driver_worker.num_cpu_blocks

    def _start_workers(self, config: EngineConfig, worker_class) -> None:
        one_node = all(node == self._node_id for node, _ in self.places)
        host = "127.0.0.1" if one_node else ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port()}"
        if one_node:  # shared-memory collectives need one host
            self._shm_paths.extend(shm_files(config) or ())
        shm_paths = self._shm_paths or None
        self._pending = [(rank, actor.init_worker.remote(config, rank, self.world, init_method,
                                                         shm_paths))
                         for rank, actor in enumerate(self.actors, start=1)]
        torch.set_num_threads(threads_per_rank(self.world))
        init_distributed(self.world, 0, init_method, collective_backend(config),
                         timeout_s=_STARTUP_TIMEOUT_S, shm_paths=shm_paths,
                         pp_size=config.parallel.pipeline_parallel_size,
                         device_index=self._bundle0_gpu() if self._use_gpu else None)
        self.driver_worker = worker_class(config)
        ray.get([ref for _, ref in self._pending], timeout=_STARTUP_TIMEOUT_S)
        self._pending = []

    def _bundle0_gpu(self) -> int:
        """This process's index of the GPU Ray reserved for rank 0's bundle."""
        probe = ray.remote(num_cpus=0, num_gpus=1)(ray.get_gpu_ids).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, self._bundles[0]))
        gpu_ids = ray.get(probe.remote(), timeout=_STARTUP_TIMEOUT_S)
        return driver_device_index(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))

    # ---- health ----------------------------------------------------------------------------
    def _actor_errors(self, wait_s: float = 0.0) -> str | None:
        """A message naming the actors that died or raised, or None. Waits up to ``wait_s``
        for a reply to fail (Ray fails a dead actor's replies once it notices), then up to
        ``_SETTLE_S`` more for a death behind the first error: one dead rank makes the
        others' collectives raise too, and the dead one is the cause to report."""
        deadline = time.monotonic() + wait_s
        died: dict[int, str] = {}
        raised: dict[int, BaseException] = {}
        first_raise = None
        while True:
            for rank in self._dead_local_ranks():
                died.setdefault(rank, "its process is gone")
            refs = [ref for _, ref in self._pending]
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            for rank, ref in self._pending:
                if ref in ready:
                    try:
                        ray.get(ref)
                    except RayActorError as e:
                        died[rank] = str(e).splitlines()[0]
                    except Exception as e:  # noqa: BLE001 - the actor's own exception
                        raised.setdefault(rank, e)
            self._pending = [(r, ref) for r, ref in self._pending if ref not in ready]
            for rank in raised:  # a rank that raised exits on purpose: not a cause
                died.pop(rank, None)
            now = time.monotonic()
            if raised and first_raise is None:
                first_raise = now
            if died or not self._pending or now >= deadline or (
                    first_raise is not None and now >= first_raise + _SETTLE_S):
                break
            time.sleep(0.05)
        pids = dict(enumerate((pid for _, pid in self.places), start=1))
        lines = [f"Ray worker rank {r} (pid {pids.get(r)}) died: {why}"
                 for r, why in sorted(died.items())]
        for r, e in sorted(raised.items()):  # in full only when no death explains it
            text = str(e).strip().splitlines()[-1] if died else str(e)
            lines.append(f"Ray worker rank {r} (pid {pids.get(r)}) raised: {text}")
        return "\n".join(lines) or None

    def _dead_local_ranks(self) -> list[int]:
        """Ranks on the engine's node whose process is gone (seen without asking Ray)."""
        return [rank for rank, (node, pid) in enumerate(self.places, start=1)
                if node == self._node_id and not pid_alive(pid)]

    @property
    def healthy(self) -> bool:
        """False once an actor died or raised (the server's /health reports it)."""
        return self._error is None and not self._dead_local_ranks()

    def _check(self) -> None:
        self._check_failed_earlier()
        err = self._actor_errors()
        if err:
            self._fail(err)

    # ---- steps -----------------------------------------------------------------------------
    def _broadcast(self, message) -> None:
        """Queue ``message`` on every actor (each runs its messages in order)."""
        t0 = time.perf_counter()
        data = self._pickle(message)
        for rank, actor in enumerate(self.actors, start=1):
            self._pending.append((rank, actor.execute_model.remote(data)))
        self._count_broadcast(len(data), t0)

    def _failed_workers(self) -> str | None:
        return self._actor_errors(wait_s=5.0)

    def collective_rpc(self, fn) -> list:
        """Run ``fn(worker)`` on every rank (``fn`` must be picklable, i.e. module-level);
        returns the results in rank order. ``fn`` must not run collectives."""
        self._check()
        refs = [actor.call.remote(fn) for actor in self.actors]
        results = [fn(self.driver_worker)]
        for rank, ref in enumerate(refs, start=1):
            try:
                results.append(ray.get(ref, timeout=_STARTUP_TIMEOUT_S))
            except Exception as e:  # noqa: BLE001
                how = "died" if isinstance(e, RayActorError) else "raised"
                self._fail(f"Ray worker rank {rank} (pid {self.places[rank - 1][1]}) {how}: "
                           f"{e}", e)
        return results

