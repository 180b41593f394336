"""Parallel overhead: output tokens/s of one rank vs tp=N or pp=N (mp executor) on one model.

Seeded random token-id prompts, fixed output length, EOS ignored, dummy weights; both runs in
this process (the tp=N ranks 1.. are spawned worker processes). Also prints what the
per-step ``SchedulerOutput`` broadcast cost (pickled bytes and seconds per step).

    python benchmarks/tensor_parallel.py --model benchmarks/configs/tiny-llama --tp 2
    python benchmarks/tensor_parallel.py --pp 2
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(model: str, tp: int, batch: int, input_len: int, output_len: int, seed: int,
        **flags) -> dict:
    from pagedllm import LLM, SamplingParams
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True,
              tensor_parallel_size=tp, pipeline_parallel_size=flags.pop("pp", 1), max_num_seqs=max(batch, 1),
              num_gpu_blocks_override=batch * (-(-(input_len + output_len) // 16)) + 16, **flags)
    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(input_len)]}
               for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    try:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        executor = llm.llm_engine.executor
        stats0 = dict(getattr(executor, "broadcast_stats", {}) or {})
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = getattr(executor, "broadcast_stats", None)
    finally:
        llm.llm_engine.executor.shutdown()
    result = {"tp": tp, "batch": batch,
              "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed}
    if stats:
        steps = stats["steps"] - stats0.get("steps", 0)
        result["bcast_bytes_per_step"] = (stats["bytes"] - stats0.get("bytes", 0)) / steps
        result["bcast_ms_per_step"] = 1e3 * (stats["seconds"] - stats0.get("seconds", 0)) / steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="benchmarks/configs/tiny-llama")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages instead of --tp")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable-custom-all-reduce", action="store_true",
                        help="tp=N collectives through gloo instead of shared memory")
    args = parser.parse_args()
    for batch in args.batch_sizes:
        base = run(args.model, 1, batch, args.input_len, args.output_len, args.seed)
        name = f"pp={args.pp}" if args.pp > 1 else f"tp={args.tp}"
        tp = run(args.model, 1 if args.pp > 1 else args.tp, batch, args.input_len,
                 args.output_len, args.seed, pp=args.pp,
                 disable_custom_all_reduce=args.disable_custom_all_reduce)
        print(f"batch {batch}: one rank {base['tok_s']:.1f} tok/s, {name} {tp['tok_s']:.1f} "
              f"tok/s ({tp['tok_s'] / base['tok_s']:.2f}x); broadcast "
              f"{tp['bcast_bytes_per_step']:.0f} B, {tp['bcast_ms_per_step']:.3f} ms per step")


if __name__ == "__main__":
    main()
