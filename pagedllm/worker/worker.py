"""One device's worker: loads the model, sizes and allocates the KV cache, runs steps.

KV-cache sizing rule (documented in the README):
- ``--num-gpu-blocks-override`` wins when given;
- on CPU: ``gpu_memory_utilization`` x the RAM available after loading the weights, capped at
  what ``max_num_seqs`` full-length sequences could ever use (a zeroed cache larger than
  that could never be filled);
- on CUDA: ``gpu_memory_utilization`` x device memory, minus what is in use after loading
  the weights (same cap). No profiling forward yet: activations and CUDA graphs live in the
  share left over (issue #5).
Swap space: ``--swap-space`` GiB of CPU memory, in blocks of the same size.
"""
from __future__ import annotations

import logging

import torch

from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.distributed import get_pp_size, get_tp_size, world_min
from pagedllm.models.loader import load_model
from pagedllm.worker.cache_engine import CacheEngine, kv_bytes_per_block
from pagedllm.worker.cuda_graph import CUDAGraphRunner
from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)
_GiB = 1 << 30


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * _GiB


class Worker:
    def __init__(self, config) -> None:
        self.config = config
        mc, cc = config.model, config.cache
        self.device = torch.device(config.device.device)
        torch.manual_seed(mc.seed)
        self.model = load_model(mc, config.load, self.device)
        tp = get_tp_size()  # each rank caches its KV heads only (one when tp exceeds them)
        num_kv_heads = mc.num_kv_heads // tp if mc.num_kv_heads >= tp else 1
        self.block_bytes = kv_bytes_per_block(mc.num_hidden_layers, cc.block_size,
                                              num_kv_heads, mc.head_dim, mc.torch_dtype)
        # every rank must agree on the block count: take the smallest
        self.num_gpu_blocks = world_min(self._num_gpu_blocks())
        self.num_cpu_blocks = int(cc.swap_space * _GiB) // self.block_bytes
        cache = CacheEngine(mc.num_hidden_layers, num_kv_heads, mc.head_dim, cc.block_size,
                            self.num_gpu_blocks, self.num_cpu_blocks, mc.torch_dtype, self.device)
        self.runner = ModelRunner(self.model, cache, self.device, mc.vocab_size, mc.seed)
        if self.device.type == "cuda" and not mc.enforce_eager and \
                self.runner.backend.name == "triton":
            graphs = CUDAGraphRunner(self.model, cache.gpu_cache, self.runner.backend,
                                     cc.block_size, config.scheduler.max_num_seqs,
                                     mc.max_seq_len_to_capture, self.device)
            self.runner.graphs = graphs  # graphs are captured on first use of each size
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB); swap space %d blocks; "
                    "maximum concurrency at %d tokens per request: %.1fx",
                    self.num_gpu_blocks, cc.block_size,
                    self.num_gpu_blocks * self.block_bytes / _GiB, self.num_cpu_blocks,
                    mc.max_model_len,
                    self.num_gpu_blocks * cc.block_size / mc.max_model_len)

    def _num_gpu_blocks(self) -> int:
        cc, sc, mc = self.config.cache, self.config.scheduler, self.config.model
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = cc.gpu_memory_utilization * total - (total - free)
        else:
            # the ranks of a CPU host share its RAM
            budget = (cc.gpu_memory_utilization * _available_ram_bytes()
                      / (get_tp_size() * get_pp_size()))
        cap = sc.max_num_seqs * cdiv(mc.max_model_len, cc.block_size)
        num_blocks = min(int(budget) // self.block_bytes, cap)
        if num_blocks <= 0:
            raise ValueError("no memory is left for the KV cache after loading the model; raise "
                             "--gpu-memory-utilization or lower --max-model-len")
        return num_blocks

    def execute_model(self, scheduler_output):
        return self.runner.execute_model(scheduler_output)
