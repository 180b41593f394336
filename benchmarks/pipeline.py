"""Pipeline micro-batches: the same -pp engine with its batches in flight (the default: as
many as stages) against one batch at a time, in one run, same prompts, same tokens checked.

    python benchmarks/pipeline.py --model benchmarks/configs/qwen2-0.5b --pp 2 \
        --num-prompts 16 --input-len 256 --output-len 2      # prefill-bound
    python benchmarks/pipeline.py --model benchmarks/configs/qwen2-0.5b --pp 2 \
        --num-prompts 8 --input-len 32 --output-len 16       # decode-bound

Dummy weights, fp32, greedy, EOS ignored; best of ``--repeats`` runs of each arm,
interleaved. Prints output tokens/s of each arm and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import make_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmarks/configs/qwen2-0.5b")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams
    llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              pipeline_parallel_size=args.pp, max_model_len=args.input_len + args.output_len)
    engine = llm.llm_engine
    vocab = engine.config.model.vocab_size
    prompts = [{"prompt_token_ids": p}
               for p in make_prompts(args.num_prompts, args.input_len, vocab, 0)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    best: dict[int, float] = {}
    tokens: dict[int, list] = {}
    for _ in range(args.repeats):
        for depth in (args.pp, 1):
            engine.pipeline_depth = engine.scheduler.pipeline_depth = depth
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            best[depth] = min(best.get(depth, 1e9), time.perf_counter() - start)
            tokens[depth] = [o.outputs[0].token_ids for o in outs]
    assert tokens[args.pp] == tokens[1], "micro-batches changed the greedy tokens"
    n = args.num_prompts * args.output_len
    for depth in (args.pp, 1):
        print(f"batches in flight {depth}: {n / best[depth]:.2f} output tok/s "
              f"({best[depth]:.2f} s)")
    print(f"ratio: {best[1] / best[args.pp]:.2f}x")
    engine.executor.shutdown()


if __name__ == "__main__":
    main()
