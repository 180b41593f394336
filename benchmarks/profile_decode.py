"""Where a batch-1 decode step of the Llama-3-8B shape spends GPU time: the kernels by CUDA
time per generated token (with the calls per token), the GPU-busy share of the wall time,
and the wall time per token. One device call:

    python benchmarks/profile_decode.py                      # eager: every torch op shows
    python benchmarks/profile_decode.py --graphs --steps 8   # as the decode benchmark runs

With ``--graphs`` the kernels inside CUDA-graph replays are listed too (CUPTI traces graph
kernel nodes), so the table shows what the fused kernels left per layer."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import make_prompts  # noqa: E402

MODEL = "benchmarks/configs/llama-3-8b"


def kernel_table(prof, tokens: int, limit: int) -> tuple[str, float]:
    """Per kernel name: microseconds and calls per token; and the GPU-busy us per token."""
    time_us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            time_us[ev.name] += ev.device_time
            calls[ev.name] += 1
    busy = sum(time_us.values()) / tokens
    rows = sorted(time_us, key=time_us.get, reverse=True)[:limit]
    lines = [f"{'us/token':>9} {'calls/token':>11} {'us/call':>8}  kernel"]
    for name in rows:
        lines.append(f"{time_us[name] / tokens:9.1f} {calls[name] / tokens:11.1f} "
                     f"{time_us[name] / calls[name]:8.2f}  {name[:110]}")
    return "\n".join(lines), busy


def idle_table(prof, tokens: int, limit: int = 12, min_gap_us: float = 3.0) -> str:
    """GPU idle time between consecutive kernels, per token, by (kernel before, kernel after):
    shows whether the device waits for the host inside a step or between schedules."""
    kernels = sorted(((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                      if ev.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    gaps, total = defaultdict(lambda: [0.0, 0]), 0.0
    small, num_small, overlap = 0.0, 0, 0.0  # gaps under min_gap_us; kernels overlapping (PDL)
    for (_, end, before), (start, _, after) in zip(kernels, kernels[1:]):
        gap = start - end
        if 0 < gap < min_gap_us:
            small, num_small = small + gap, num_small + 1
        elif gap < 0:
            overlap -= gap
        if gap >= min_gap_us:
            total += gap
            entry = gaps[(before[:40], after[:40])]
            entry[0] += gap
            entry[1] += 1
    lines = [f"GPU idle in gaps >= {min_gap_us} us: {total / tokens:.0f} us per token; in "
             f"{num_small / tokens:.0f} smaller gaps: {small / tokens:.0f} us per token; "
             f"kernels overlapping the one before (PDL): {overlap / tokens:.0f} us per token",
             f"{'us/token':>9} {'gaps/token':>10}  kernel before -> kernel after"]
    for key in sorted(gaps, key=lambda k: gaps[k][0], reverse=True)[:limit]:
        lines.append(f"{gaps[key][0] / tokens:9.1f} {gaps[key][1] / tokens:10.2f}  "
                     f"{key[0]} -> {key[1]}")
    return "\n".join(lines)


def host_copy_table(prof, tokens: int, limit: int = 8) -> str:
    """Host<->device copies by the Python stack that issued them: a pageable copy makes the
    host wait for the device, so one inside the decode loop leaves the GPU idle after it."""
    sites = defaultdict(int)
    for ev in prof.events():
        kinds = {k.name for k in ev.kernels if "HtoD" in k.name or "DtoH" in k.name}
        if kinds and ev.device_type == torch.autograd.DeviceType.CPU:
            frames = [f for f in ev.stack if "pagedllm" in f or "benchmarks" in f][:3]
            sites[(ev.name, "/".join(sorted(kinds))[:30], " <- ".join(frames))] += 1
    lines = [f"{'per token':>9}  op, copy, pagedllm stack"]
    for key in sorted(sites, key=sites.get, reverse=True)[:limit]:
        lines.append(f"{sites[key] / tokens:9.2f}  {key[0]} {key[1]} {key[2][:200]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs on (default: eager)")
    parser.add_argument("--steps", type=int, default=1, help="--num-scheduler-steps")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--quant", choices=["gptq", "awq"],
                        help="the model with a W4A16 g128 quantization_config (random packed "
                        "words, as benchmarks/quant_bench.py makes them)")
    parser.add_argument("--quantization", choices=["fp8"], default=None,
                        help="quantize the bf16 weights at load (--quantization fp8)")
    parser.add_argument("--stacks", action="store_true",
                        help="record Python stacks; list host<->device copies by call site "
                        "(slows the host: the idle table is then not representative)")
    parser.add_argument("--cprofile", action="store_true",
                        help="also print the host functions by own time (cProfile)")
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams
    prompt = [{"prompt_token_ids": make_prompts(1, 128, 128256, 0)[0]}]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    start = time.perf_counter()
    model = args.model
    if args.quant:
        from benchmarks.quant_bench import model_dir
        model = model_dir(args.quant, args.model)
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
              enforce_eager=not args.graphs, num_scheduler_steps=args.steps,
              quantization=args.quantization)
    if args.quant:
        from benchmarks.quant_bench import randomize_packed
        randomize_packed(llm)
    mode = (f"{'graphs' if args.graphs else 'eager'}, {args.steps} step(s), "
            f"{args.quant or args.quantization or 'bf16'}")
    print(f"start-up ({mode}, dummy weights): {time.perf_counter() - start:.1f} s")
    llm.generate(prompt, params, use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    wall = (time.perf_counter() - t) / args.tokens * 1e6
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                 with_stack=args.stacks) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    table, busy = kernel_table(prof, args.tokens, args.rows)
    print(table)
    print(idle_table(prof, args.tokens))
    if args.stacks:
        print(host_copy_table(prof, args.tokens))
    if args.cprofile:
        import cProfile
        import pstats
        host = cProfile.Profile()
        host.runcall(llm.generate, prompt, params, use_tqdm=False)
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
    print(f"{mode}: {wall:.0f} us per token wall ({1e6 / wall:.1f} tok/s, prefill included), "
          f"GPU busy {busy:.0f} us per token ({busy / wall:.0%})")


if __name__ == "__main__":
    main()
