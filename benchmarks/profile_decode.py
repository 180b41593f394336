"""Where a batch-1 decode step of the Llama-3-8B shape spends GPU time (eager mode, so each
kernel shows): top kernels by CUDA time per generated token, and the step time with and
without CUDA graphs. One H100 call: ``python benchmarks/profile_decode.py``."""
from __future__ import annotations

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import make_prompts  # noqa: E402

MODEL = "benchmarks/configs/llama-3-8b"


def main() -> None:
    from pagedllm import LLM, SamplingParams
    prompt = [{"prompt_token_ids": make_prompts(1, 128, 128256, 0)[0]}]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    start = time.perf_counter()
    llm = LLM(model=MODEL, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=1024, max_num_seqs=8, enforce_eager=True)
    print(f"start-up (eager, dummy weights): {time.perf_counter() - start:.1f} s")
    llm.generate(prompt, params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    print(f"eager: {(time.perf_counter() - t) / 64 * 1e3:.2f} ms per token")


if __name__ == "__main__":
    main()
