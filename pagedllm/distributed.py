"""Process groups and collectives for tensor parallelism (gloo on CPU, NCCL on CUDA).

The only mutable module state is ``STATE``, one ``ParallelState`` describing this process:
its tensor-parallel rank and size, the ``torch.distributed`` group and, on CPU, the
shared-memory communicator. Every collective is a no-op at tensor-parallel size 1, so
single-device code paths never touch ``torch.distributed``.

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


STATE = ParallelState()  # this process's place in the tensor-parallel group


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


def send_to_next_stage(x: torch.Tensor) -> None:
    dist.send(x.contiguous(), dst=STATE.pp_rank + 1)


def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device | None = None) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, src=STATE.pp_rank - 1)
    return x


def broadcast_from_last_stage(x: torch.Tensor | None, shape: tuple[int, ...],
                              dtype: torch.dtype,
                              device: torch.device | None = None) -> torch.Tensor:
    """The last stage's ``x`` on every stage (others pass None)."""
    if STATE.pp_size == 1:
        return x
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(x.contiguous(), src=STATE.pp_size - 1)
    return x


def world_min(value: int) -> int:
    """The smallest ``value`` over every rank of every group (e.g. KV-cache block counts)."""
    if not dist.is_initialized() or STATE.tp_size * STATE.pp_size == 1:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


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
            if int(self._flags[r]) < seq and not _alive(int(self._pids[r])):
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


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not attached yet
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def init_distributed(world_size: int, rank: int, init_method: str, backend: str = "gloo",
                     timeout_s: float = 60.0, shm_path: str | None = None,
                     pp_size: int = 1) -> None:
    """Join the group of ``world_size`` ranks (one per process): tensor-parallel ranks, or
    (``pp_size`` = ``world_size``) pipeline stages; ``shm_path`` (a
    ``ShmComm.create_file``) enables the shared-memory tensor-parallel collectives."""
    if world_size == 1:
        STATE.tp_size, STATE.tp_rank, STATE.group, STATE.shm = 1, 0, None, None
        STATE.pp_size, STATE.pp_rank = 1, 0
        return
    if pp_size not in (1, world_size):
        raise ValueError("tensor and pipeline parallelism together are not supported yet")
    dist.init_process_group(backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=datetime.timedelta(seconds=timeout_s))
    if pp_size > 1:
        STATE.pp_size, STATE.pp_rank = pp_size, rank
        dist.barrier()
        return
    STATE.tp_size, STATE.tp_rank, STATE.group = world_size, rank, dist.group.WORLD
    STATE.shm = ShmComm(shm_path, rank, world_size) if shm_path else None
    dist.barrier(group=STATE.group)  # every rank has mapped the file and written its pid


def destroy_distributed() -> None:
    if STATE.shm is not None:
        STATE.shm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    STATE.tp_size, STATE.tp_rank, STATE.group, STATE.shm = 1, 0, None, None
    STATE.pp_size, STATE.pp_rank = 1, 0


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
    if STATE.tp_size == 1:
        return x
    dist.broadcast(x, src=src, group=STATE.group)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if STATE.tp_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=STATE.group)
    return box[0]


def shard_range(size: int, rank: int | None = None, tp: int | None = None) -> tuple[int, int]:
    """[start, end) of rank's equal slice of ``size`` (which must divide by tp)."""
    rank = STATE.tp_rank if rank is None else rank
    tp = STATE.tp_size if tp is None else tp
    if size % tp:
        raise ValueError(f"dimension {size} does not divide by --tensor-parallel-size {tp}")
    per = size // tp
    return rank * per, (rank + 1) * per
