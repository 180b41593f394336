"""CUDA graphs for decode steps (``--enforce-eager`` turns them off).

One graph per padded batch size (1, 2, 4, then multiples of 8 up to ``--max-num-seqs``, at
most 256, like vLLM: bigger decode batches run eagerly), all sharing one memory pool and one
set of static input buffers:
1. at start-up every size is captured, largest first (``capture()``): run the model once
   (warm-up) and capture it with every row inert (slot -1: nothing written; sequence length
   0: nothing read), so capturing never touches live KV data and the graph only ever
   reads/writes what replay-time inputs say. Capturing lazily on first use instead cost the
   offline-throughput run ~8 s of captures inside the measured time (H100, 1000 x 256/256)
   as the batch shrank through every size;
2. a decode-only step whose longest sequence fits ``--max-seq-len-to-capture`` copies its
   inputs into the buffers of the smallest size that holds it, pads the rest, replays, and
   returns the first rows of that graph's output;
3. the later steps of a multi-step batch advance the buffers in place instead (one kernel:
   ids in, positions, slots and lengths one token on; ``graph_step.py``) and replay.
Only decode batches are captured; prefills and mixed steps run eagerly.
"""
from __future__ import annotations

import logging
import time

import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)


MAX_CAPTURE_SIZE = 256


def capture_sizes(max_num_seqs: int) -> list[int]:
    max_num_seqs = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs]
    sizes += list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] < max_num_seqs:
        sizes.append(-(-max_num_seqs // 8) * 8)
    return sizes


class CUDAGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: dict[int, torch.Tensor],
                 backend: AttentionBackend, block_size: int, max_num_seqs: int,
                 max_seq_len_to_capture: int, device: torch.device,
                 kv_scales: list[tuple[float, float]] | None = None) -> None:
        self.model = model
        self.kv_scales = kv_scales
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_seq_len = max_seq_len_to_capture
        max_bs = self.sizes[-1]
        self.max_blocks = -(-max_seq_len_to_capture // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)  # [max_bs]
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)  # [max_bs]
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)  # [max_bs]
        # [max_bs, max_blocks]
        self.block_table = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.pool = None  # one memory pool shared by every graph
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> [size, hidden] static output

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(self.block_size, self.slot_mapping[:size], size,
                                 self.seq_lens[:size], self.block_table[:size], [])
        ctx = ForwardContext(meta, self.kv_caches, self.backend, self.kv_scales)
        return self.model(self.input_ids[:size], self.positions[:size], ctx)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the pool fits them all (at start-up)."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        for size in sorted(self.sizes, reverse=True):
            self.slot_mapping[:size].fill_(-1)
            self.seq_lens[:size].fill_(0)
            self._forward(size)  # warm-up: Triton compiles, allocator settles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / (1 << 30)
        logger.info("captured CUDA graphs for batch sizes %s in %.2f s, %.3f GiB",
                    self.sizes, time.perf_counter() - start, used)

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Decode-only, fits the largest graph, and no sequence longer than captured."""
        return (not meta.prefills and meta.num_decodes <= self.sizes[-1]
                and meta.decode_block_table.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_decodes
        size = next(s for s in self.sizes if s >= n)
        width = meta.decode_block_table.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.seq_lens[n:size].fill_(0)
        self.block_table[:n, :width].copy_(meta.decode_block_table)
        return self.replay(n)

    def replay(self, n: int) -> torch.Tensor:
        """Replay the graph of n rows on what the static buffers hold."""
        size = next(s for s in self.sizes if s >= n)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        """The next step of a multi-step batch whose last step ran here (``run`` or
        ``advance``): its rows take ``ids`` as input and move on by one token in the static
        buffers (one kernel, ``graph_step.advance``), then the graph replays."""
        from pagedllm.worker import graph_step
        graph_step.advance(ids, self.input_ids, self.positions, self.slot_mapping,
                           self.seq_lens, self.block_table, self.block_size)
        return self.replay(ids.shape[0])
