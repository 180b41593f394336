"""``pagedllm bench latency``: end-to-end latency of one batch (batch 1 by default: the
decode-bound case) through ``LLM.generate``, repeated, as vLLM's benchmark_latency reports it
(average and percentiles of the batch's wall time), with the engine's flags."""
from __future__ import annotations

import time


def run(engine_args, batch_size: int, input_len: int, output_len: int, num_iters_warmup: int,
        num_iters: int, seed: int) -> dict:
    from pagedllm import LLM, SamplingParams
    from pagedllm.bench.report import distribution_ms
    from pagedllm.bench.throughput import _vocab_size, make_prompts
    llm = LLM.from_engine_args(engine_args)
    prompts = [{"prompt_token_ids": p} for p in
               make_prompts(batch_size, input_len, _vocab_size(engine_args.model), seed)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for _ in range(num_iters_warmup):
        llm.generate(prompts, params, use_tqdm=False)
    latencies = []
    for _ in range(num_iters):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        latencies.append(time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    dist = distribution_ms(latencies)
    summary = {"batch_size": batch_size, "input_len": input_len, "output_len": output_len,
               "num_iters": num_iters, "avg_latency_s": round(dist["mean"] / 1000, 4),
               "latency_ms": dist,
               # one decode step per output token after the first (prefill) step
               "ms_per_output_token": round(dist["mean"] / output_len, 3)}
    return {"benchmark": "latency", "summary": summary, "samples": {"latency_s": latencies}}
