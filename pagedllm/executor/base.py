"""The executor interface: what the engine core calls to run steps on its ranks, whatever the
backend (``uniproc.py``: one ``Worker`` in process; ``multiproc.py`` / ``ray_executor.py``:
tensor x pipeline ranks, through ``parallel.ParallelExecutor``). An executor is complete once
constructed: its workers have loaded the model and sized the KV cache."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
    from pagedllm.worker.worker import Worker


class Executor(ABC):
    """Runs the scheduler's steps on every rank; rank 0's ``Worker`` is ``driver_worker``."""

    driver_worker: Worker
    num_gpu_blocks: int  # KV-cache blocks every rank holds (the smallest rank's count)
    num_cpu_blocks: int  # swap blocks

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """False once a rank died or raised (the server's /health reports it)."""

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput) -> None:
        """The first half of a step on every rank: the forward is queued, nothing is waited
        for (the engine core's in-flight queue of batches; see ModelRunner)."""

    @abstractmethod
    def finish(self) -> ModelRunnerOutput | None:
        """The second half of the oldest launched step on every rank; rank 0's output."""

    @abstractmethod
    def collective_rpc(self, fn: Callable[[Worker], Any]) -> list:
        """``fn(worker)`` on every rank, results in rank order (``fn`` picklable with
        several ranks, and running no collectives)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the ranks and release what rank 0 holds; idempotent."""
