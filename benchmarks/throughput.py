"""Offline throughput: pagedllm ``LLM.generate`` vs Hugging Face ``generate`` on one model.

A fixed synthetic workload (seeded random token-id prompts, fixed output length, EOS ignored)
runs through both engines on the same model shape, with dummy weights, in the same process.
Prints output tokens/s of each, their ratio, and for batch 1 the share of the memory
roofline (weight bytes read per decode step / copy bandwidth measured here).

    python benchmarks/throughput.py --model benchmarks/configs/tiny-llama --batch-sizes 1 32
    python benchmarks/throughput.py --model benchmarks/configs/qwen2-0.5b --batch-sizes 1 8 \
        --input-len 32 --output-len 32
    python benchmarks/throughput.py --mixed-sampling --batch-sizes 64 --skip-hf

``--mixed-sampling`` also runs a workload that mixes temperature, top-p, top-k, min-p,
penalties, logit bias and seeds across the batch, and prints its overhead over greedy
(``--repeats`` interleaved runs of each arm, 3 by default, best kept). Dummy weights give
nearly flat logits (the nucleus of a top-p row is most of the vocabulary); ``--logit-scale
S`` multiplies the LM head by S so that the logits are peaked like a trained model's (both
arms run on the scaled model).
"""
# A thin wrapper: the logic lives in pagedllm.bench.throughput (also behind `pagedllm bench
# throughput`); these names stay importable from here for the other benchmark scripts.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedllm.bench.throughput import (  # noqa: E402,F401
    bench_hf, bench_pagedllm, copy_bandwidth_gbs, make_prompts, mixed_sampling_params,
    scale_lm_head, script_main as main, weight_bytes_per_step)

if __name__ == "__main__":
    main()
