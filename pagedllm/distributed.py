"""Process groups and collectives for tensor and pipeline parallelism (gloo on CPU, NCCL on
CUDA).

The only mutable module state is ``STATE``, one ``ParallelState`` describing this process:
its tensor-parallel rank and size, its pipeline stage, the ``torch.distributed`` groups and,
on CPU, the shared-memory communicator. Every collective is a no-op at size 1, so
single-device code paths never touch ``torch.distributed``.

Layout of ``tp x pp`` ranks: global rank = ``pp_rank * tp + tp_rank``. Each stage's ``tp``
consecutive ranks form a tensor-parallel group (all-reduce / all-gather); the ranks with the
same ``tp_rank`` form a pipeline group. Stage ``s`` tensor rank ``t`` sends its hidden
states (replicated within the stage after the row-parallel all-reduce) to stage ``s+1``
tensor rank ``t`` (``isend``: see ``send_to_next_stage``); the last stage broadcasts the
logits over each pipeline group::

    tp=2, pp=2:   stage 0: [rank 0, rank 1]  --send-->  stage 1: [rank 2, rank 3]
                  pipeline groups: {0, 2}, {1, 3}     tensor groups: {0, 1}, {2, 3}

On CPU, ``all_reduce`` and ``all_gather`` of tensors up to ``ShmComm.SLOT_BYTES`` go through
``ShmComm`` (a file in /dev/shm mapped by every rank; ~10x faster than gloo's TCP loopback
for the small activations of decode steps); larger ones and ``--disable-custom-all-reduce``
use gloo. Both give every rank bit-identical results.
"""
from __future__ import annotations

import datetime
import mmap
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    group: Any = None  # the tensor-parallel process group (None at size 1)
    shm: "ShmComm | None" = None  # the shared-memory fast path (CPU only)
    pp_size: int = 1
    pp_rank: int = 0  # this process's pipeline stage
    pp_group: Any = None  # the ranks of every stage with this tp_rank (None at size 1)


STATE = ParallelState()  # this process's place in the tensor / pipeline groups


def get_tp_size() -> int:
    return STATE.tp_size


def get_tp_rank() -> int:
    return STATE.tp_rank


def get_pp_size() -> int:
    return STATE.pp_size


def get_pp_rank() -> int:
    return STATE.pp_rank


def is_first_stage() -> bool:
    return STATE.pp_rank == 0


def is_last_stage() -> bool:
    return STATE.pp_rank == STATE.pp_size - 1


def stage_layers(num_layers: int) -> range:
    """The contiguous layers of this pipeline stage (earlier stages take the remainder)."""
    per, extra = divmod(num_layers, STATE.pp_size)
    start = STATE.pp_rank * per + min(STATE.pp_rank, extra)
    return range(start, start + per + (STATE.pp_rank < extra))


def _global_rank(pp_rank: int) -> int:
    """The global rank of stage ``pp_rank``'s counterpart of this tensor-parallel rank."""
    return pp_rank * STATE.tp_size + STATE.tp_rank


# a send started and not yet waited for: its work handle and the tensor it reads (kept
# alive until the wait)
PendingSend = tuple[Any, torch.Tensor]


def send_to_next_stage(x: torch.Tensor, sends: list[PendingSend]) -> None:
    """Start sending ``x`` to the next stage and return at once: with micro-batches in
    flight this stage may run the next batch before the next stage has received this one
    (a blocking send could then wait on a stage that waits on us). The send goes into
    ``sends`` (the forward's ``ForwardContext.sends``), which the runner keeps with the
    step until ``wait_sends``."""
    x = x.contiguous()
    sends.append((dist.isend(x, dst=_global_rank(STATE.pp_rank + 1)), x))


def wait_sends(sends: list[PendingSend]) -> None:
    for work, _ in sends:
        work.wait()


def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device | None = None) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, src=_global_rank(STATE.pp_rank - 1))
    return x


def broadcast_from_last_stage(x: torch.Tensor | None, shape: tuple[int, ...],
                              dtype: torch.dtype,
                              device: torch.device | None = None) -> torch.Tensor:
    """The last stage's ``x`` on every stage (others pass None)."""
    if STATE.pp_size == 1:
        return x
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    x = x.contiguous()
    dist.broadcast(x, src=_global_rank(STATE.pp_size - 1), group=STATE.pp_group)
    return x


def world_min(value: int) -> int:
    """The smallest ``value`` over every rank of every group (e.g. KV-cache block counts)."""
    if not dist.is_initialized() or STATE.tp_size * STATE.pp_size == 1:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def in_turns(fn, max_concurrent: int | None):
    """Run ``fn`` on at most ``max_concurrent`` ranks at a time, in global rank order (all
    ranks call this; e.g. --max-parallel-loading-workers bounds the host RAM that loading
    takes). Returns ``fn``'s result and the wall-clock ``(start, end)`` of this rank's run."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    batch = max_concurrent or world
    result, window = None, (0.0, 0.0)
    for turn in range(-(-world // batch)):
        if rank // batch == turn:
            start = time.time()
            result = fn()
            window = (start, time.time())
        if batch < world:
            dist.barrier()
    return result, window


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShmComm:
    """All-reduce / all-gather through shared memory for the ranks of one host.

    Layout of the mapped file: a header of one 64-byte line per rank (its pid and the
    sequence number of the last collective it posted), then two buffers (used alternately,
    so one wait per collective suffices) of one ``SLOT_BYTES`` slot per rank. A rank copies
    its tensor into its slot, posts the sequence number, waits until every rank posted it,
    then reads all slots in rank order (so every rank computes the same bits). Waiting
    yields the CPU and checks every 0.1 s that the other ranks are alive: a dead rank raises
    ``RuntimeError`` instead of hanging. Relies on x86's store ordering (data before flag).
    """
    SLOT_BYTES = 4 << 20
    _LINE = 64

    def __init__(self, path: str, rank: int, world: int) -> None:
        self.path, self.rank, self.world = path, rank, world
        size = self.file_size(world)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        header = raw[:world * self._LINE].view(torch.int64).view(world, self._LINE // 8)
        self._pids, self._flags = header[:, 0], header[:, 1]
        self._data = raw[world * self._LINE:].view(2, world, self.SLOT_BYTES)
        self._seq = 0
        self._pids[rank] = os.getpid()

    @classmethod
    def file_size(cls, world: int) -> int:
        return world * cls._LINE + 2 * world * cls.SLOT_BYTES

    @classmethod
    def create_file(cls, world: int) -> str:
        """A zeroed file of the right size (in /dev/shm when present); the caller unlinks it."""
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="pagedllm-tp-", dir=folder)
        os.ftruncate(fd, cls.file_size(world))
        os.close(fd)
        return path

    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.SLOT_BYTES

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post ``x``; return every rank's tensor (views of shared memory, valid until the
        collective after next)."""
        self._seq += 1
        buf = self._data[self._seq % 2]
        nbytes = x.numel() * x.element_size()
        flat = x.contiguous().view(-1)
        buf[self.rank, :nbytes].view(x.dtype).copy_(flat)
        self._flags[self.rank] = self._seq
        self._wait(self._seq)
        return [buf[r, :nbytes].view(x.dtype).view(x.shape) for r in range(self.world)]

    def _wait(self, seq: int) -> None:
        spins, next_check = 0, time.monotonic() + 0.1
        while int(self._flags.min()) < seq:
            spins += 1
            if spins > 50:
                os.sched_yield()
                if time.monotonic() > next_check:
                    self._check_peers(seq)
                    next_check = time.monotonic() + 0.1

    def _check_peers(self, seq: int) -> None:
        for r in range(self.world):
            if int(self._flags[r]) < seq and not pid_alive(int(self._pids[r])):
                raise RuntimeError(f"tensor-parallel rank {r} (pid {int(self._pids[r])}) died "
                                   "during a collective")

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        parts = self._exchange(x)
        out = parts[0].clone()
        for part in parts[1:]:
            if op == "sum":
                out += part
            else:
                out = torch.minimum(out, part) if op == "min" else torch.maximum(out, part)
        return x.copy_(out)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=dim)

    def close(self) -> None:
        self._pids = self._flags = self._data = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the OS frees it at exit
            pass


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not attached yet
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def init_distributed(world_size: int, rank: int, init_method: str, backend: str = "gloo",
                     timeout_s: float = 60.0, shm_paths: list[str] | None = None,
                     pp_size: int = 1, device_index: int | None = None) -> None:
    """Join the group of ``world_size`` = ``tp * pp_size`` ranks (one per process) laid out
    as in the module docstring; ``shm_paths`` (one ``ShmComm.create_file`` per stage)
    enables the shared-memory tensor-parallel collectives. With NCCL each rank first binds
    its GPU: ``device_index``, else ``rank`` modulo the GPUs this process sees (one host;
    a Ray actor sees only its own GPU)."""
    if world_size == 1:
        _reset_state()
        return
    if world_size % pp_size:
        raise ValueError(f"world size {world_size} does not divide by the {pp_size} stages")
    if backend == "nccl":
        torch.cuda.set_device(device_index if device_index is not None
                              else rank % torch.cuda.device_count())
    tp = world_size // pp_size
    dist.init_process_group(backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout_s))
    STATE.pp_size, STATE.pp_rank = pp_size, rank // tp
    STATE.tp_size, STATE.tp_rank = tp, rank % tp
    # every rank creates every group, in the same order (torch.distributed requires it)
    tp_groups = ([dist.group.WORLD] if pp_size == 1 else
                 [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp_size)])
    pp_groups = ([dist.group.WORLD] if tp == 1 else
                 [dist.new_group(list(range(t, world_size, tp))) for t in range(tp)])
    if tp > 1:
        STATE.group = tp_groups[STATE.pp_rank]
        STATE.shm = (ShmComm(shm_paths[STATE.pp_rank], STATE.tp_rank, tp) if shm_paths
                     else None)
    if pp_size > 1:
        STATE.pp_group = pp_groups[STATE.tp_rank]
    dist.barrier()  # every rank has mapped its stage's file and written its pid


def _reset_state() -> None:
    STATE.tp_size, STATE.tp_rank, STATE.group, STATE.shm = 1, 0, None, None
    STATE.pp_size, STATE.pp_rank, STATE.pp_group = 1, 0, None


def destroy_distributed() -> None:
    if STATE.shm is not None:
        STATE.shm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    _reset_state()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or min/max) of ``x`` over the ranks, in place; returns ``x``."""
    if STATE.tp_size == 1:
        return x
    if STATE.shm is not None and STATE.shm.fits(x):
        return STATE.shm.all_reduce(x, op)
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                           "max": dist.ReduceOp.MAX}[op], group=STATE.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order."""
    if STATE.tp_size == 1:
        return x
    if STATE.shm is not None and STATE.shm.fits(x):
        return STATE.shm.all_gather(x, dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(STATE.tp_size)]
    dist.all_gather(parts, x, group=STATE.group)
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Tensor rank ``src``'s ``x`` on every rank of this stage's tensor-parallel group."""
    if STATE.tp_size == 1:
        return x
    dist.broadcast(x, src=STATE.pp_rank * STATE.tp_size + src, group=STATE.group)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if STATE.tp_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=STATE.pp_rank * STATE.tp_size + src, group=STATE.group)
    return box[0]


def shard_range(size: int, rank: int | None = None, tp: int | None = None) -> tuple[int, int]:
    """[start, end) of rank's equal slice of ``size`` (which must divide by tp)."""
    rank = STATE.tp_rank if rank is None else rank
    tp = STATE.tp_size if tp is None else tp
    if size % tp:
        raise ValueError(f"dimension {size} does not divide by --tensor-parallel-size {tp}")
    per = size // tp
    return rank * per, (rank + 1) * per
