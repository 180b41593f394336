"""One device's worker: loads the model, sizes and allocates the KV cache, runs steps.

KV-cache sizing rule (documented in the README):
- ``--num-gpu-blocks-override`` wins when given;
- on CPU: ``gpu_memory_utilization`` x the RAM available after loading the weights, capped at
  what ``max_num_seqs`` full-length sequences could ever use (a zeroed cache larger than
  that could never be filled);
- on CUDA: ``gpu_memory_utilization`` x device memory, minus what is in use after loading
  the weights (weights, CUDA context, other processes), minus the activation peak of a
  profiling step: ``max_num_batched_tokens`` prompt tokens split over up to
  ``max_num_seqs`` sequences, run through the real runner (forward, logits, top-k/top-p
  sampling) on a throw-away cache; same cap. CUDA graphs are captured after the KV cache
  is allocated and live in the share left over (``1 - gpu_memory_utilization``).
  ``--cpu-offload-gb`` moves linear layers to host memory before any of this, so the
  weights it takes off the device go to the KV cache.
A block's bytes count this rank's KV heads and its pipeline stage's layers only (each
stage caches just its layers), so a stage holds more blocks than a whole-model rank would;
every rank then takes the smallest count over all ranks (``world_min``), which the stage
with the most layers usually sets.
Swap space: ``--swap-space`` GiB of CPU memory, in blocks of the same size.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import time

import torch

from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler_output import NewRequestData, SchedulerOutput
from pagedllm.attention.kv_quant import is_fp8, kv_cache_torch_dtype, load_kv_scales
from pagedllm.models.cpu_offload import offload_linear_weights
from pagedllm.distributed import (get_pp_size, get_tp_rank, get_tp_size, in_turns, stage_layers,
                                  world_min)
from pagedllm.models.loader import load_model
from pagedllm.attention.cache_spec import check_cache_dtype, kv_cache_spec_for
from pagedllm.worker.adapters import AdapterStore
from pagedllm.worker.cache_engine import CacheEngine
from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

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
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc, cc = config.model, config.cache
        self.device = torch.device(config.device.device)
        torch.manual_seed(mc.seed)
        started = time.perf_counter()
        # --max-parallel-loading-workers: ranks load in turns of that many
        self.model, self.load_window = in_turns(lambda: load_model(mc, config.load, self.device),
                                                config.load.max_parallel_loading_workers)
        if cc.cpu_offload_gb:
            offload_linear_weights(self.model, int(cc.cpu_offload_gb * _GiB), self.device)
        self.lora_table = self._lora_slots()  # before the KV cache is sized: slots take memory
        # adapter weights by id (the engine loads a request's into the driver's at add time)
        self.adapters = AdapterStore(mc, config.lora, config.prompt_adapter)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()
                                if p.device.type == self.device.type)  # on the device
        self.activation_bytes = 0
        # what a token costs per layer on this rank: its K/V heads, or an MLA latent
        self.cache_spec = kv_cache_spec_for(self.model, mc, get_tp_size())
        self.cache_dtype = kv_cache_torch_dtype(cc.kv_cache_dtype, mc.torch_dtype)
        check_cache_dtype(self.cache_spec, cc.kv_cache_dtype)
        self.kv_scales = load_kv_scales(cc.quantization_param_path, mc.num_hidden_layers,
                                        get_tp_rank(), self.cache_dtype) \
            if is_fp8(self.cache_dtype) else None  # per layer (k, v) of an fp8 cache
        # a pipeline stage caches only its own layers, so its blocks cost that share
        self.layer_ids = stage_layers(mc.num_hidden_layers)
        self.block_bytes = self.cache_spec.bytes_per_block(len(self.layer_ids), cc.block_size,
                                                           self.cache_dtype)
        loaded = time.perf_counter()
        # every rank must agree on the block count: take the smallest
        self.num_gpu_blocks = world_min(self._num_gpu_blocks())
        sized = time.perf_counter()
        # stages of unequal layer counts fit different swap block counts: take the smallest
        self.num_cpu_blocks = world_min(int(cc.swap_space * _GiB) // self.block_bytes)
        cache = CacheEngine(self.layer_ids, self.cache_spec, cc.block_size,
                            self.num_gpu_blocks, self.num_cpu_blocks, self.cache_dtype,
                            self.device)
        spec = config.spec
        self.runner = ModelRunner(
            self.model, cache, self.device, mc.vocab_size, mc.seed, self.kv_scales,
            spec.typical if spec else None, config.detailed_traces, self.lora_table,
            self._graph_sizes(), self.adapters)
        logger.info("start-up: weights loaded in %.2f s, KV cache sized (memory profile) in "
                    "%.2f s, cache allocated and graphs captured in %.2f s", loaded - started,
                    sized - loaded, time.perf_counter() - sized)
        logger.info("weights %.2f GiB, activation peak %.2f GiB; KV cache: %d blocks of %d "
                    "tokens (%.2f GiB); swap space %d blocks; maximum concurrency at %d tokens "
                    "per request: %.1fx", self.weight_bytes / _GiB,
                    self.activation_bytes / _GiB, self.num_gpu_blocks, cc.block_size,
                    self.num_gpu_blocks * self.block_bytes / _GiB, self.num_cpu_blocks,
                    mc.max_model_len,
                    self.num_gpu_blocks * cc.block_size / mc.max_model_len)

    def _graph_sizes(self) -> tuple[int, int] | None:
        """(max_num_seqs, max_seq_len_to_capture) for the runner's CUDA graphs, or None
        where they cannot run (CPU, --enforce-eager, --enable-lora, pipeline stages)."""
        mc = self.config.model
        if self.device.type != "cuda" or mc.enforce_eager:
            return None
        if self.lora_table is not None:
            logger.info("CUDA graphs are off with --enable-lora (each batch's adapter rows "
                        "change the work); steps run eagerly")
            return None
        if get_pp_size() > 1:
            logger.info("CUDA graphs are off with pipeline parallelism (the sends between "
                        "stages are not captured); steps run eagerly")
            return None
        if not getattr(self.model, "supports_cuda_graphs", True):
            logger.info("CUDA graphs are off for %s (its attention runs the PyTorch path, "
                        "which graphs do not capture yet); steps run eagerly",
                        type(self.model).__name__)
            return None
        if getattr(self.model, "pooler", None) is not None:
            return None  # pooling models run prompts only: no decode steps to capture
        return self.config.scheduler.max_num_seqs, mc.max_seq_len_to_capture

    def _lora_slots(self):
        """--enable-lora: the runner's slot buffers on every LoRA-capable projection."""
        lc = self.config.lora
        if not lc.enable_lora:
            return None
        from pagedllm.worker.lora import LoRASlotTable, check_lora_support
        check_lora_support(self.model, self.config.model.hf_config.architectures[0]
                           if getattr(self.config.model.hf_config, "architectures", None)
                           else type(self.model).__name__)
        dtype = self.config.model.torch_dtype if lc.lora_dtype == "auto" else \
            getattr(torch, lc.lora_dtype)
        return LoRASlotTable(self.model, lc.max_loras, lc.max_lora_rank, dtype, self.device)

    def _num_gpu_blocks(self) -> int:
        cc, sc, mc = self.config.cache, self.config.scheduler, self.config.model
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if self.device.type == "cuda":
            self.activation_bytes = self.profile_activation_bytes()
            # in use now: weights, CUDA context, library workspaces, other processes
            free, total = torch.cuda.mem_get_info(self.device)
            budget = cc.gpu_memory_utilization * total - (total - free) - self.activation_bytes
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

    @torch.inference_mode()
    def profile_activation_bytes(self) -> int:
        """Peak memory one full step allocates beyond the weights (see the module docstring)."""
        mc, cc, sc = self.config.model, self.config.cache, self.config.scheduler
        bs = cc.block_size
        num_tokens = sc.max_num_batched_tokens
        num_seqs = max(min(sc.max_num_seqs, num_tokens), cdiv(num_tokens, mc.max_model_len))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        lens = [n for n in lens if n > 0]
        num_blocks = sum(cdiv(n, bs) for n in lens)
        cache = CacheEngine(self.layer_ids, self.cache_spec, bs, num_blocks, 0,
                            self.cache_dtype, self.device)
        runner = ModelRunner(self.model, cache, self.device, mc.vocab_size, mc.seed,
                             self.kv_scales, lora_table=self.lora_table, adapters=self.adapters)
        loras = self._profile_loras()
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=1)
        params.update_from_generation_config([])
        pooling = PoolingParams() if runner.pooler is not None else None
        reqs, first_block = [], 0
        for i, n in enumerate(lens):
            ids = torch.randint(0, mc.vocab_size, (n,), generator=gen).tolist()
            blocks = list(range(first_block, first_block + cdiv(n, bs)))
            first_block += len(blocks)
            reqs.append(NewRequestData(f"profile-{i}", ids, n, params, blocks, 0, 0,
                                       lora_request=loras[i % len(loras)],
                                       pooling_params=pooling))
        so = SchedulerOutput(reqs, [], {r.req_id: len(r.token_ids) for r in reqs}, num_tokens)
        runner.execute_model(so)  # warm-up: kernels compile, library workspaces are created
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        # the same step again: finished ids are dropped before new requests are added
        runner.execute_model(SchedulerOutput(reqs, [], so.num_scheduled_tokens, num_tokens,
                                             finished_req_ids=set(so.num_scheduled_tokens)))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del runner, cache
        for lora in loras:
            if lora is not None:
                self.adapters.remove_lora(lora.lora_int_id)
        torch.cuda.empty_cache()
        return peak

    def _profile_loras(self) -> list:
        """--enable-lora: the profile's rows split over up to two all-zero adapters (ids
        below 0, never a user's), so the peak holds the deltas' gathers too."""
        if self.lora_table is None or self.adapters.loras is None:
            return [None]
        from pagedllm.core.adapters import LoRARequest
        from pagedllm.worker.lora import LoadedLoRA
        requests = [LoRARequest("profile", -1 - i)
                    for i in range(min(2, self.config.lora.max_loras))]
        for request in requests:
            self.adapters.loras.put(request, LoadedLoRA(request.lora_int_id, "profile", 1,
                                                        0.0, {}))
        return requests

    def launch(self, scheduler_output) -> None:
        """First half of a step (the forward queued; see ModelRunner)."""
        self.runner.launch(scheduler_output)

    def finish(self):
        """Second half of the oldest launched step: its ModelRunnerOutput."""
        return self.runner.finish()
