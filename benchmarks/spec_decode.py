"""Prompt-lookup speculative decoding against plain decoding, one request at a time (the
latency case speculation is for), on input-grounded prompts: a passage of Python's own
documentation, a blank line, then the passage's first words again, so that a model that
continues the passage copies from its prompt. Both engines run in this process on the same
prompts; greedy tokens are checked equal; prints tokens/s of each, their ratio and the
draft acceptance rate.

    python benchmarks/spec_decode.py                       # the bundled demo model, CPU
    python benchmarks/spec_decode.py --model DIR --num-speculative-tokens 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def passages(count: int, words: int) -> list[str]:
    """Deterministic passages from pydoc's topic texts (the demo model's training text)."""
    from pydoc_data.topics import topics
    out = []
    for name in sorted(topics)[::7]:
        text = " ".join(topics[name].split())
        if len(text.split()) >= words:
            out.append(" ".join(text.split()[:words]))
        if len(out) == count:
            break
    return out


def run(llm, prompts, params) -> tuple[float, list[list[int]]]:
    tokens, start = [], time.perf_counter()
    for prompt in prompts:  # one at a time
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        tokens.append(list(out.token_ids))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pagedllm/demo_model")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--passage-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--ngram-prompt-lookup-max", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    import torch
    from pagedllm import LLM, SamplingParams
    torch.manual_seed(0)
    prompts = [p + "\n\n" + " ".join(p.split()[:8]) for p in
               passages(args.num_prompts, args.passage_words)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for name, extra in (("plain", {}), ("ngram", dict(
            speculative_model="[ngram]", num_speculative_tokens=args.num_speculative_tokens,
            ngram_prompt_lookup_max=args.ngram_prompt_lookup_max))):
        llm = LLM(model=args.model, dtype=args.dtype, **extra)
        run(llm, prompts[:1], params)  # warm-up
        results[name] = run(llm, prompts, params)
        if name == "ngram":
            sched = llm.llm_engine.scheduler
            acceptance, efficiency = sched.spec_rates()
        del llm
    (t_plain, plain), (t_spec, spec) = results["plain"], results["ngram"]
    assert spec == plain, "speculation changed greedy tokens"
    n = sum(len(t) for t in plain)
    print(f"{len(prompts)} prompts one at a time, {n} tokens: plain {n / t_plain:.1f} tok/s, "
          f"ngram k={args.num_speculative_tokens} {n / t_spec:.1f} tok/s, "
          f"ratio {t_plain / t_spec:.2f}x; draft acceptance {acceptance:.2f}, "
          f"efficiency {efficiency:.2f}")


if __name__ == "__main__":
    main()
