"""The batch-1 decode CUDA graph of the Llama-3-8B shape replayed back to back: device time
per replay, the gap between two replays, and the host time of one ``replay()`` call
(``PAGEDLLM_PDL=0`` for the plain launches). One device call:

    python benchmarks/graph_replay.py
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPLAYS = 30


def kernels(prof) -> list[tuple[float, float, str]]:
    return sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])


def main() -> None:
    from pagedllm import LLM, SamplingParams
    llm = LLM(model="benchmarks/configs/llama-3-8b", load_format="dummy",
              skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
              num_scheduler_steps=8)
    llm.generate([{"prompt_token_ids": list(range(5, 133))}],
                 SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    graphs = llm.llm_engine.worker.runner.graphs
    graphs.slot_mapping.fill_(-1)  # write nothing; read 300 keys of whatever the cache holds
    graphs.seq_lens.fill_(0)
    graphs.seq_lens[0] = 300
    graph = graphs.graphs[1]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as one:
        graph.replay()
        torch.cuda.synchronize()
    first = kernels(one)
    n = len(first)
    with profile(activities=[ProfilerActivity.CUDA]) as many:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    ks = kernels(many)
    groups = [ks[i * n:(i + 1) * n] for i in range(REPLAYS)]
    gaps = sorted(b[0][0] - a[-1][1] for a, b in zip(groups, groups[1:]))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    per_replay = (time.perf_counter() - start) / 100 * 1e6
    host = []
    for _ in range(11):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    print(f"PDL {'off' if os.environ.get('PAGEDLLM_PDL') == '0' else 'on'}: {n} kernels a "
          f"replay, first kernel start to last kernel end {first[-1][1] - first[0][0]:.0f} us, "
          f"{per_replay:.0f} us a replay back to back, gap between replays median "
          f"{gaps[len(gaps) // 2]:.1f} us, host time of replay() median "
          f"{sorted(host)[5] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
