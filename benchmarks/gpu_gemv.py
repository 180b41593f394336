"""One-token projections (batch-1 decode) of the Llama-3-8B shape: the Triton GEMV
(``triton_ops.gemv``) over a sweep of tile configs against cuBLAS (``F.linear``), both in
CUDA-graph replay as decode runs them, weights rotated over enough copies that L2 (60 MB on
an H200) holds none of them between uses. Prints, per shape, cuBLAS and the best configs in
microseconds and GB/s, the copy bandwidth measured in the same run, and the best configs
(those beating cuBLAS are the candidates for ``triton_ops.GEMV_CONFIGS``).

    python benchmarks/gpu_gemv.py                                   # Llama-3-8B shapes
    python benchmarks/gpu_gemv.py --model benchmarks/configs/qwen3-0.6b   # any config's
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import copy_bandwidth_gbs  # noqa: E402
from pagedllm.layers import triton_ops as ops  # noqa: E402

MODEL = "benchmarks/configs/llama-3-8b"
# (block_n, block_k, warps, prefetch); the tile at most 16K elements, at least 1K
CONFIGS = [c for c in itertools.product((1, 2, 4, 8), (256, 512, 1024, 2048, 4096), (2, 4, 8),
                                        (0, 1)) if 1024 <= c[0] * c[1] <= 16384]
REPS = 10
REP_MS = 200


def graph_time_us(fn, weights, x) -> float:
    """Median microseconds of one call of fn(x, w), over graph replays of REPS passes over
    every weight copy."""
    for w in weights:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            for w in weights:
                fn(x, w)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=REP_MS, return_mode="median")
    return ms * 1e3 / (REPS * len(weights))


def model_shapes(path: str) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, gated) of a Llama-family config's one-token projections at tp 1:
    qkv, o_proj, gate_up (+ SiLU), down (MoE configs: the router instead), LM head."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attention = [("qkv", (heads + 2 * kv_heads) * head_dim, hidden, False),
                 ("o_proj", hidden, heads * head_dim, False)]
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:  # MoE: the router is the one dense MLP-side projection (experts: moe_bench)
        mlp = [("router", experts, hidden, False)]
    else:
        mlp = [("gate_up+silu", 2 * cfg.intermediate_size, hidden, True),
               ("down", hidden, cfg.intermediate_size, False)]
    return attention + mlp + [("lm_head", cfg.vocab_size, hidden, False)]


def main() -> None:
    global REP_MS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL, help="config directory whose shapes to tune")
    parser.add_argument("--rep-ms", type=int, default=REP_MS, help="timing budget a config")
    parser.add_argument("--json", help="write the best config of each [N, K] here")
    args = parser.parse_args()
    REP_MS = args.rep_ms
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bandwidth_gbs(dev, 1 << 30, repeats=20):.0f} "
          "GB/s (read + write)")
    best_configs, faster = {}, {}
    for name, n, k, gated in model_shapes(args.model):
        nbytes = n * k * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
                   for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)

        def cublas(x, w):
            out = torch.nn.functional.linear(x, w)
            return ops.silu_and_mul(out) if gated else out

        ref = ops.gemv_ref(x, weights[0], gated=gated)
        base = graph_time_us(cublas, weights, x)
        results = []
        for cfg in CONFIGS:
            try:
                out = ops.gemv(x, weights[0], gated=gated, config=cfg)
            except Exception as e:  # e.g. a tile too large for shared memory or registers
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                continue
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                print(f"  {name} {cfg}: rel err {err:.2e} FAILS")
                continue
            t = graph_time_us(lambda x, w: ops.gemv(x, w, gated=gated, config=cfg), weights, x)
            results.append((t, cfg))
        results.sort()
        best_configs[(n, k)] = results[0][1]
        if results[0][0] < base:
            faster[(n, k)] = results[0][1]
        top = ", ".join(f"{c} {t:.2f} us" for t, c in results[:3])
        print(f"{name:13s} N={n:6d} K={k:5d} {nbytes / 1e6:6.1f} MB: cuBLAS {base:7.2f} us "
              f"({nbytes / base / 1e3:5.0f} GB/s); gemv best {results[0][0]:7.2f} us "
              f"({nbytes / results[0][0] / 1e3:5.0f} GB/s, {base / results[0][0]:.2f}x); "
              f"top: {top}", flush=True)
        del weights
        if args.json:  # after every shape: a sweep cut short still leaves its results
            with open(args.json, "w") as f:
                json.dump({f"{n}x{k}": list(c) for (n, k), c in best_configs.items()}, f)
    print("best configs:", best_configs)
    # candidates for triton_ops.GEMV_CONFIGS: confirm each in the decode benchmark
    # (PAGEDLLM_GEMV=all vs off), where launch gaps and the rest of the step count too
    print("faster than cuBLAS here:", faster)


if __name__ == "__main__":
    main()
