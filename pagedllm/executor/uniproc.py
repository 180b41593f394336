"""One device: the ``Worker`` runs in the engine process."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.executor.base import Executor
from pagedllm.worker.worker import Worker

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.driver_worker = Worker(config)
        self.num_gpu_blocks = self.driver_worker.num_gpu_blocks
        self.num_cpu_blocks = self.driver_worker.num_cpu_blocks

    healthy = True

    def launch(self, scheduler_output) -> None:
        self.driver_worker.launch(scheduler_output)

    def finish(self):
        return self.driver_worker.finish()

    def collective_rpc(self, fn) -> list:
        return [fn(self.driver_worker)]

    def shutdown(self) -> None:
        pass
