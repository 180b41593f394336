"""Where the offline-throughput workload (Llama-3-8B shape, N x 256/256, bf16, dummy weights)
spends its time: wall time of steps with prefills vs decode-only steps, tokens per step, and
for a window of steady-state decode steps the GPU kernel time against the wall time (the
rest is host work the GPU waits for), with the top kernels. One H100 call:

    python benchmarks/profile_throughput.py --num-prompts 1000 [--max-num-seqs 256] \
        [--num-scheduler-steps 8] [engine flags as key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_workloads import parse_engine_args  # noqa: E402
from benchmarks.throughput import make_prompts  # noqa: E402

MODEL = "benchmarks/configs/llama-3-8b"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--num-scheduler-steps", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="engine flags as key=value (ints parsed)")
    args = parser.parse_args()
    extra = parse_engine_args(args.extra)
    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import RequestOutputKind
    kwargs = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=528, max_num_seqs=args.max_num_seqs,
                  num_scheduler_steps=args.num_scheduler_steps)
    llm = LLM(model=args.model, **{**kwargs, **extra})
    engine = llm.llm_engine
    prompts = make_prompts(args.num_prompts, 256, engine.config.model.vocab_size, 0)
    # final outputs only, as LLM.generate asks for
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    original = engine.scheduler.schedule
    current = {}

    def schedule():
        out = original()
        current["prefill"] = sum(n for n in out.num_scheduled_tokens.values() if n > 1)
        current["seqs"] = len(out.num_scheduled_tokens)
        current["steps"] = out.num_steps
        return out
    engine.scheduler.schedule = schedule
    rows, tokens, profiled = [], 0, None
    sync()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        decode_only = rows and rows[-1]["prefill"] == 0 and rows[-1]["seqs"] >= \
            min(args.max_num_seqs, args.num_prompts) // 2
        if profiled is None and decode_only and len(rows) > 40:
            with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available()
                                     else ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                steps = [dict(current)]
                for _ in range(args.profile_steps):
                    tokens += sum(len(o.outputs[0].token_ids) for o in engine.step()
                                  if o.finished)
                    steps.append(dict(current))
                sync()
                wall = time.perf_counter() - t
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"
                       or not torch.cuda.is_available()]
            gpu = sum(e.self_device_time_total for e in kernels) / 1e6
            kernels.sort(key=lambda e: -e.self_device_time_total)
            profiled = dict(wall_s=round(wall, 4), gpu_kernel_s=round(gpu, 4),
                            gpu_busy=round(gpu / wall, 3), steps=steps,
                            top=[(e.key[:60], round(e.self_device_time_total / 1e3, 2))
                                 for e in kernels[:15]])
            continue
        t = time.perf_counter()
        outs = engine.step()
        tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
        rows.append(dict(current, s=time.perf_counter() - t))
    elapsed = time.perf_counter() - start
    prefill = [r for r in rows if r["prefill"]]
    decode = [r for r in rows if not r["prefill"]]
    print(json.dumps(dict(
        num_prompts=args.num_prompts, max_num_seqs=args.max_num_seqs, extra=extra,
        num_scheduler_steps=args.num_scheduler_steps, output_tok_s=round(tokens / elapsed, 1),
        seconds=round(elapsed, 2),
        prefill_steps=len(prefill), prefill_s=round(sum(r["s"] for r in prefill), 2),
        prefill_tokens_per_step=round(sum(r["prefill"] for r in prefill) / max(len(prefill), 1)),
        decode_steps=len(decode), decode_s=round(sum(r["s"] for r in decode), 2),
        decode_seqs_per_step=round(sum(r["seqs"] for r in decode) / max(len(decode), 1), 1),
        decode_ms_per_token_step=round(1e3 * sum(r["s"] for r in decode) /
                                       max(sum(r["steps"] for r in decode), 1), 2),
        profile=profiled)), flush=True)


if __name__ == "__main__":
    main()
