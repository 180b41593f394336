"""Mixture-of-experts benchmarks (issue 23), each ratio from one run:

1. ``layer``: the fused MoE layer alone (``fused_moe_triton.fused_moe``), Qwen3-30B-A3B expert
   shape (128 experts, top-8, hidden 2048, expert intermediate 768, bf16) at 1/16/64/256
   tokens: microseconds per call in CUDA-graph replay over 8 rotating routings (the experts
   differ call to call, as between layers), bytes of expert weights the calls read (distinct
   experts x expert bytes), that over the time as GB/s, and its share of the copy bandwidth
   measured in the same run; also the torch path (``moe_static``, what CUDA ran before) at the
   same shapes. ``--tune`` sweeps the kernel's tile configs per token count (best printed:
   candidates for ``fused_moe_triton.MOE_CONFIGS``).
2. ``decode``: the engine on the Qwen3-30B-A3B shape (48 layers, dummy weights, bf16), batch 1,
   128 in / 256 out: tok/s against the roofline of the weights read per token (attention +
   router + 8 experts + norms + LM head, over the copy bandwidth).
3. ``offline`` (``--offline``): 1000 x 256/256 output tok/s of the Qwen3-30B-A3B shape and of
   the Llama-3-8B shape, in the same run.

    python benchmarks/moe_bench.py                    # layer + decode (one H100: ~3 min)
    python benchmarks/moe_bench.py --only layer --tune
    python benchmarks/moe_bench.py --only offline     # the 1000 x 256/256 comparison
    python benchmarks/moe_bench.py --smoke            # tiny shapes, CPU (interpreter) or GPU

Prints one JSON line per result, the table last; ``--out DIR`` also writes them to
DIR/moe_bench.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

SMOKE = "--smoke" in sys.argv
if not torch.cuda.is_available():  # the kernels run under Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("TRITON_INTERPRET") == "1":  # the gaps tests/kernels fill too
    from tests.utils.triton_interpreter import patch_interpreter
    patch_interpreter()

MODEL = "benchmarks/configs/qwen3-30b-a3b"
DENSE = "benchmarks/configs/llama-3-8b"
ROWS: list[dict] = []
OUT_FILE: str | None = None


def emit(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    if OUT_FILE:
        with open(OUT_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")


def per_call_us(calls: list, reps: int, dev: torch.device) -> float:
    """Median microseconds of one call: CUDA-graph replay of ``reps`` passes over the calls
    (one host-timed pass on CPU)."""
    for call in calls:
        call()
    if dev.type != "cuda":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    import triton
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return ms * 1e3 / (reps * len(calls))


def layer_problem(shape: dict, tokens: int, dtype, dev, routings: int):
    """Random x, stacked experts, and ``routings`` routings (weights, ids) from random logits
    through ``select_experts`` (softmax, renormalised as Qwen3-MoE)."""
    from pagedllm.layers.moe import select_experts
    gen = torch.Generator(device=dev).manual_seed(tokens)
    e, h, i, k = shape["experts"], shape["hidden"], shape["inter"], shape["top_k"]
    x = torch.randn(tokens, h, device=dev, generator=gen).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, device=dev, generator=gen) / h ** 0.5).to(dtype)
    down = (torch.randn(e, h, i, device=dev, generator=gen) / i ** 0.5).to(dtype)
    routes = [select_experts(torch.randn(tokens, e, device=dev, generator=gen), k,
                             renormalize=True) for _ in range(routings)]
    return x, gate_up, down, routes


def check_fused(x, gate_up, down, weights, ids, configs=None) -> float:
    """Relative error of the fused kernels against the torch loop (float64)."""
    from pagedllm.layers.activation import ActAndMul
    from pagedllm.layers.fused_moe_triton import fused_moe
    from pagedllm.layers.moe import moe_reference
    out = fused_moe(x, gate_up, down, weights, ids, configs).double()
    ref = moe_reference(x.double(), gate_up.double(), down.double(), weights.double(), ids,
                        ActAndMul("silu"))
    return ((out - ref).norm() / ref.norm()).item()


def bench_layer_at(shape: dict, tokens: int, args, dev, copy_gbs: float) -> None:
    from pagedllm.layers.activation import ActAndMul
    from pagedllm.layers.fused_moe_triton import MOE_GEMV_MAX_TOKENS, fused_moe, moe_path
    from pagedllm.layers.moe import moe_static
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    x, gate_up, down, routes = layer_problem(shape, tokens, dtype, dev, args.routings)
    err = check_fused(x, gate_up, down, *routes[0])
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    read = sum(int(ids.unique().numel()) for _, ids in routes) * expert_bytes / len(routes)
    fused_us = per_call_us([lambda w=w, i=i: fused_moe(x, gate_up, down, w, i)
                            for w, i in routes], args.reps, dev)
    act = ActAndMul("silu")
    torch_us = per_call_us([lambda w=w, i=i: moe_static(x, gate_up, down, w, i, act)
                            for w, i in routes[:2]], 1, dev) if tokens <= 64 else None
    gbs = read / fused_us / 1e3
    gemv, table = moe_path(tokens, shape["top_k"], shape["experts"])
    other_us = per_call_us([lambda w=w, i=i: fused_moe(x, gate_up, down, w, i, gemv=not gemv)
                            for w, i in routes],
                           args.reps, dev) if tokens <= 4 * MOE_GEMV_MAX_TOKENS else None
    emit(bench="moe layer", shape=shape["name"], tokens=tokens, fused_us=round(fused_us, 2),
         path="gemv" if gemv else "sorted",
         other_path_us=round(other_us, 2) if other_us else None,
         expert_mb_read=round(read / 1e6, 1), gbs=round(gbs, 1),
         copy_share=round(gbs / copy_gbs, 3) if copy_gbs else None,
         torch_static_us=round(torch_us, 1) if torch_us else None,
         speedup_vs_torch=round(torch_us / fused_us, 2) if torch_us else None,
         rel_err=f"{err:.1e}", configs=list(table))
    if args.tune:
        tune(shape, tokens, x, gate_up, down, routes, args, dev, fused_us)


def tune_candidates(smoke: bool) -> list[tuple]:
    if smoke:
        return [(16, 32, 64, 4, 2), (32, 64, 32, 4, 2)]
    out = []
    for bm in (16, 32, 64):
        for bn in (32, 64, 128):
            for bk in (64, 128, 256):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        if bm * bk + bk * bn * 2 <= 64 * 256 + 256 * 128:
                            out.append((bm, bn, bk, warps, stages))
    return out


def gemv_candidates(smoke: bool) -> list[tuple]:
    """(BLOCK_N, BLOCK_K, num_warps) of the per-token GEMV path."""
    if smoke:
        return [(1, 16, 1), (2, 32, 2)]
    return [(bn, bk, w) for bn in (1, 2, 4) for bk in (256, 512, 1024, 2048) for w in (2, 4, 8)
            if bn * bk <= 2048]


def tune(shape, tokens, x, gate_up, down, routes, args, dev, current_us) -> None:
    """Each candidate tile config for the gate/up launch (down at its table config) and then
    for the down launch (gate/up at the best found): the best of each, checked for
    correctness. Batches of the GEMV path sweep its (BLOCK_N, BLOCK_K, warps) instead."""
    from pagedllm.layers.fused_moe_triton import fused_moe, moe_path
    gemv, table = moe_path(tokens, shape["top_k"], shape["experts"])
    best = list(table)
    for which in (0, 1):
        results = []
        for cand in (gemv_candidates if gemv else tune_candidates)(SMOKE):
            configs = tuple(cand if j == which else best[j] for j in (0, 1))
            try:
                err = check_fused(x, gate_up, down, *routes[0], configs)
                if not err < 2e-2:
                    continue
                calls = [lambda w=w, i=i, c=configs: fused_moe(x, gate_up, down, w, i, c)
                         for w, i in routes]
                us = per_call_us(calls, args.reps, dev)
            except Exception as e:  # a tile too large for shared memory or registers
                print(f"  {cand}: {type(e).__name__}: {str(e)[:120]}")
                continue
            results.append((us, cand))
        results.sort()
        if results:
            best[which] = results[0][1]
    us = per_call_us([lambda w=w, i=i: fused_moe(x, gate_up, down, w, i, tuple(best))
                      for w, i in routes], args.reps, dev)
    emit(bench="moe layer tune", shape=shape["name"], tokens=tokens, best_gate_up=best[0],
         best_down=best[1], best_us=round(us, 2), table_us=round(current_us, 2))
    if args.apply_tuned and gemv and us < current_us:  # the decode runs below use them
        import pagedllm.layers.fused_moe_triton as fm
        fm.MOE_GEMV_CONFIGS = tuple(best)


def bench_layer(args, dev, copy_gbs: float) -> None:
    shape = (dict(name="tiny", experts=8, hidden=64, inter=32, top_k=2) if SMOKE else
             dict(name="qwen3-30b-a3b", experts=128, hidden=2048, inter=768, top_k=8))
    for tokens in args.tokens:
        bench_layer_at(shape, tokens, args, dev, copy_gbs)


def tiny_moe_config() -> str:
    """A 2-layer Qwen3-MoE config directory (smoke runs)."""
    with open(os.path.join(MODEL, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               num_experts=8, num_experts_per_tok=2, vocab_size=512, torch_dtype="float32",
               bos_token_id=1, eos_token_id=2)
    path = tempfile.mkdtemp(prefix="moe-smoke-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def decode_bytes_per_token(model_dir: str, quantization: str | None = None) -> int:
    """Parameter bytes one batch-1 decode step reads: everything but the embedding table,
    with only top-k of each layer's experts (HF's module names; bf16). ``quantization``
    "fp8": the decoder layers' matrices (experts, attention) at one byte, the routers, norms
    and LM head in bf16 (scales left out: under 0.1%)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.throughput import weight_bytes_per_step
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if ".experts." in n)
    num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts  # (Mixtral)
    share = cfg.num_experts_per_tok / num_experts
    unread = experts * (1 - share)
    total = weight_bytes_per_step(model) - unread
    if quantization == "fp8":  # 2 bytes -> 1 for the layers' read matrices
        total -= sum(p.numel() * (share if ".experts." in n else 1)
                     for n, p in model.named_parameters()
                     if ".layers." in n and p.dim() >= 2 and not n.endswith("mlp.gate.weight"))
    elif quantization is not None:
        raise ValueError(f"moe_bench: --quantization {quantization}: the roofline knows fp8")
    return int(total)


def generate(llm, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, int]:
    """(seconds, output tokens) of one greedy ``generate`` (EOS ignored), on any device."""
    from pagedllm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(output_lens)
    return elapsed, tokens


def release_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_llm(model: str, max_model_len: int, dev, **kw):
    from pagedllm import LLM
    kw = {**dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=max_model_len,
                 dtype="float32" if dev.type == "cpu" else "bfloat16"), **kw}
    return LLM(model=model, **kw)


def bench_decode(args, dev, copy_gbs: float) -> None:
    from benchmarks.throughput import make_prompts
    model = tiny_moe_config() if SMOKE else args.model
    out_len = 8 if SMOKE else 256
    step_bytes = decode_bytes_per_token(model, args.quantization)
    roofline = copy_gbs * 1e9 / step_bytes
    import pagedllm.layers.fused_moe_triton as fm
    flags = {"quantization": args.quantization} if args.quantization else {}
    llm = make_llm(model, 1024, dev, max_num_seqs=8, **flags)
    prompt = make_prompts(1, 16 if SMOKE else 128, 500, 0)
    generate(llm, prompt, [4])  # warm-up
    best = min(generate(llm, prompt, [out_len])[0] for _ in range(2))
    emit(bench="moe decode b=1", model=os.path.basename(model.rstrip("/")),
         tok_s=round(out_len / best, 1), roofline_tok_s=round(roofline, 1),
         roofline_share=round(out_len / best / roofline, 3),
         gb_read_per_token=round(step_bytes / 1e9, 3), copy_gbs=round(copy_gbs, 1),
         gemv_configs=fm.MOE_GEMV_CONFIGS, quantization=args.quantization)
    del llm
    release_memory()


def offline_rate(model: str, n: int, length: int, dev) -> float:
    """Output tok/s of ``model`` on n x length/length (emitted)."""
    from benchmarks.throughput import make_prompts
    llm = make_llm(model, 2 * length + 16, dev, gpu_memory_utilization=0.9, max_num_seqs=256)
    prompts = make_prompts(n, length, 500, 0)
    generate(llm, prompts[:4], [4] * 4)
    elapsed, tokens = generate(llm, prompts, [length] * n)
    emit(bench=f"offline {n} x {length}/{length}", model=os.path.basename(model.rstrip("/")),
         output_tok_s=round(tokens / elapsed, 1), seconds=round(elapsed, 2))
    del llm
    release_memory()
    return tokens / elapsed


def offline_in_child(model: str, args) -> float:
    """``offline_rate`` in a fresh interpreter: a deleted engine does not hand all of its GPU
    memory back (the 30B's 61 GB left no room for the 8B's KV cache)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "offline", "--offline-model",
           model, "--num-prompts", str(args.num_prompts)] + (["--out", args.out]
                                                              if args.out else [])
    cmd += ["--smoke"] if SMOKE else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines()
            if line.startswith("{") and "output_tok_s" in line]
    if done.returncode or not rows:
        raise RuntimeError(f"offline run of {model} failed (exit {done.returncode}):\n"
                           f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    ROWS.append(rows[-1])
    print(json.dumps(rows[-1]), flush=True)
    return rows[-1]["output_tok_s"]


def bench_offline(args, dev) -> None:
    n, length = (8, 8) if SMOKE else (args.num_prompts, 256)
    if args.offline_model:  # a child of offline_in_child
        offline_rate(args.offline_model, n, length, dev)
        return
    models = [tiny_moe_config(), "benchmarks/configs/tiny-llama"] if SMOKE else [MODEL, DENSE]
    rates = [offline_in_child(model, args) for model in models]
    emit(bench="offline moe / dense", ratio=round(rates[0] / rates[1], 3))


def table(title: str = "moe_bench") -> None:
    print(f"\n== {title} summary")
    for row in ROWS:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))


def main() -> None:
    global OUT_FILE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["layer", "decode", "offline"],
                        default=["layer", "decode"])
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--model", default=MODEL, help="the MoE config of the decode benchmark "
                        "(e.g. benchmarks/configs/mixtral-8x7b-2l: Mixtral-8x7B cut to 2 layers)")
    parser.add_argument("--quantization", choices=["fp8"], default=None,
                        help="the decode benchmark's --quantization (fp8: MoE experts and "
                        "dense layers in fp8, e.g. benchmarks/configs/mixtral-8x7b, which does "
                        "not fit one H100 in bf16)")
    parser.add_argument("--tune", action="store_true", help="sweep the layer's tile configs")
    parser.add_argument("--apply-tuned", action="store_true",
                        help="the decode runs of this process use the per-token GEMV configs "
                        "the --tune sweep found, where faster (as if committed to "
                        "MOE_GEMV_CONFIGS)")
    parser.add_argument("--offline", action="store_true", help="also 1000 x 256/256 vs 8B")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--offline-model", default=None,
                        help="the offline run of this one model only (its own process)")
    parser.add_argument("--routings", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: a quick end-to-end "
                        "check of this script (CPU: the Triton interpreter)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write JSON here")
    args = parser.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        OUT_FILE = os.path.join(args.out, "moe_bench.jsonl")
    args.tokens = args.tokens or ([1, 4] if SMOKE else [1, 16, 64, 256])
    args.routings, args.reps = (2, 1) if SMOKE else (args.routings, args.reps)
    from benchmarks.throughput import copy_bandwidth_gbs
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_gbs = None  # an offline-only run leaves the GPU's memory to its children's engines
    if "layer" in args.only or "decode" in args.only:
        copy_gbs = copy_bandwidth_gbs(dev, 1 << (20 if SMOKE else 30), repeats=20)
    emit(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
         torch=torch.__version__, copy_gbs=copy_gbs and round(copy_gbs, 1), smoke=SMOKE)
    if "layer" in args.only:
        bench_layer(args, dev, copy_gbs)
    if "decode" in args.only:
        bench_decode(args, dev, copy_gbs)
    if args.offline or "offline" in args.only:
        bench_offline(args, dev)
    table()


if __name__ == "__main__":
    main()
