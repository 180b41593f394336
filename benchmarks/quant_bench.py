"""Quantized-weight benchmarks (issue 22), Llama-3-8B shape, random weights, every ratio
against pagedllm bf16 measured in the same run:

1. ``kernels``: each projection of a decode step (qkv, o_proj, gate_up, down) at 1/16/64
   rows: the Triton W4A16 kernels (``triton_wna16``, GPTQ and AWQ layouts, group 128; AWQ
   repacked at load as its method does on CUDA; ``w4mma``: the tensor-core kernel of
   ``triton_w4mma`` that GPTQ / AWQ layers take on CUDA since the eighth part) and fp8
   W8A8 (``torch._scaled_mm`` with dynamic activation scales) against bf16 ``F.linear``, and
   at one row the Triton GEMVs: bf16 (``triton_ops.gemv``) and fp8 (``triton_fp8.fp8_gemv``,
   dynamic scale inside; gate_up with the fused SiLU epilogue), in
   CUDA-graph replay over enough weight copies that L2 holds none between uses: microseconds,
   GB/s of the bytes the weight occupies, speed-up. ``--tune`` sweeps the GEMV / GEMM tile
   configs (candidates for ``triton_wna16``'s defaults), ``--tune-fp8`` the fp8 GEMV's
   (candidates for ``triton_fp8.FP8_GEMV_CONFIGS``).
2. ``engine``: ``LLM.generate`` with dummy weights (packed words then filled with random bits,
   never zeros): bf16, GPTQ W4A16 g128, AWQ W4A16 g128 and ``--quantization fp8`` (W8A8,
   dynamic scales) at batch 1 / 16 / 64, 128 in / 256 out (``--formats ... nf4``: a
   bitsandbytes NF4 checkpoint too, dummy packed bytes): output tok/s and the ratio to bf16;
   and (``--offline``, on by default) fp8 vs bf16 on 1000 x 256/256.

    python benchmarks/quant_bench.py                  # kernels + engine (one H100: ~6 min)
    python benchmarks/quant_bench.py --only kernels --tune
    python benchmarks/quant_bench.py --only kernels --rows 1 --tune-fp8  # fp8 GEMV vs bf16
    python benchmarks/quant_bench.py --only engine --formats bf16 fp8 --batches 1  # + offline
    python benchmarks/quant_bench.py --smoke          # tiny shapes, CPU (interpreter) or GPU

Prints one JSON line per result and a summary table last; ``--out DIR`` (default $OUT) also
writes DIR/quant_bench.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import benchmarks.moe_bench as mb  # noqa: E402  (before triton: sets TRITON_INTERPRET on CPU)

SMOKE = mb.SMOKE
LLAMA = "benchmarks/configs/llama-3-8b"
TINY = "benchmarks/configs/tiny-llama"
GROUP = 16 if SMOKE else 128
FORMATS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
             "sym": True, "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
            "version": "gemm"},
    # a pre-quantized bitsandbytes NF4 checkpoint (blocksize 64; Triton GEMV / GEMM /
    # dequantize on CUDA)
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": False,
            "bnb_4bit_quant_storage": "uint8"},
}


def shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of the decode step's projections (two small ones for smoke runs)."""
    if SMOKE:
        return [("qkv", 96, 64), ("down", 64, 128)]
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = hidden // heads
    return [("qkv", (heads + 2 * kv) * head_dim, hidden), ("o_proj", hidden, hidden),
            ("gate_up", 2 * cfg["intermediate_size"], hidden),
            ("down", hidden, cfg["intermediate_size"])]


def random_words(shape, dev) -> torch.Tensor:
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int64, device=dev).to(torch.int32)


def make_gemv(kind: str, n: int, k: int, dtype, dev, gated: bool):
    """(callable, weight bytes) of the one-row Triton GEMVs: ``bf16_gemv``
    (``triton_ops.gemv``, its tuned config) and ``fp8_gemv`` (``triton_fp8.fp8_gemv``,
    dynamic activation scale computed inside, as ``--quantization fp8`` runs it); ``gated``
    (gate_up): the fused silu(gate) * up epilogue, as the MLP calls them."""
    from pagedllm.layers import triton_ops
    from pagedllm.quant import fp8, triton_fp8
    if kind == "bf16_gemv":
        w = torch.randn(n, k, device=dev).to(dtype) / k ** 0.5
        return (lambda x, cfg=None: triton_ops.gemv(x, w, gated=gated)), \
            w.numel() * w.element_size()
    w = (torch.randn(n, k, device=dev) * 0.05).to(fp8.FP8)
    scale = torch.full((n,), 0.01, device=dev)
    return (lambda x, cfg=None: triton_fp8.fp8_gemv(x, w, scale, None, "dynamic", gated=gated,
                                                    config=cfg)), w.numel()


def make_weight(kind: str, n: int, k: int, dtype, dev, gated: bool = False):
    """(callable x -> x @ W^T, bytes the weight occupies) for one random weight."""
    from pagedllm.quant import fp8
    from pagedllm.quant import triton_wna16 as wq
    groups = k // GROUP
    if kind in ("bf16_gemv", "fp8_gemv"):
        return make_gemv(kind, n, k, dtype, dev, gated)
    if kind == "bf16":
        w = torch.randn(n, k, device=dev).to(dtype) / k ** 0.5
        return (lambda x, cfg=None: F.linear(x, w)), w.numel() * w.element_size()
    if kind == "fp8":
        w = (torch.randn(n, k, device=dev) * 0.05).to(fp8.FP8)
        scale = torch.full((n,), 0.01, device=dev)
        return (lambda x, cfg=None: fp8.scaled_mm_fp8(x, w, scale, None, False, "tensor")), \
            w.numel()
    if kind == "nf4":  # bitsandbytes 4-bit: bytes [N, K/2], absmax per 64, the NF4 codebook
        from pagedllm.quant import triton_nf4
        packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.int32).to(
            torch.uint8)
        absmax = torch.rand(n, k // 64, device=dev) * 0.05 + 0.01
        code = torch.linspace(-1.0, 1.0, 16, device=dev)
        return (lambda x, cfg=None: triton_nf4.nf4_matmul(x, packed, absmax, code,
                                                          config=cfg)), \
            packed.numel() + absmax.numel() * 4
    scales = (torch.rand(groups, n, device=dev) * 0.02 + 0.005).to(dtype)
    if kind == "w4mma":  # GPTQ repacked for the tensor-core kernel (random words either way)
        from pagedllm.quant import triton_w4mma
        words = random_words((n // 16, k // 64, 32, 4), dev)
        qz = random_words((groups, n // 8), dev)
        nbytes = (words.numel() + qz.numel()) * 4 + scales.numel() * scales.element_size()
        return (lambda x, cfg=None: triton_w4mma.w4_matmul(x, words, qz, scales, GROUP, 1,
                                                            gated=gated, config=cfg)), nbytes
    if kind == "gptq":
        qw, qz = random_words((k // 8, n), dev), random_words((groups, n // 8), dev)
        weight = wq.gptq_weight(qw, qz, scales, None, 4, GROUP, False, 1)
    else:  # AWQ's checkpoint layout, repacked at load as the AWQ method does on CUDA
        qw, qz = wq.repack_awq(random_words((k, n // 8), dev),
                               random_words((groups, n // 8), dev))
        weight = wq.gptq_weight(qw, qz, scales, None, 4, GROUP, False, 0)
    nbytes = (qw.numel() + qz.numel()) * 4 + scales.numel() * scales.element_size()
    return (lambda x, cfg=None: wq.wna16_matmul(x, weight, config=cfg)), nbytes


def time_kind(kind, n, k, rows, dtype, dev, cfg=None, gated=False) -> tuple[float, int]:
    """(us per call, weight bytes) over rotating copies of the weight."""
    fn, nbytes = make_weight(kind, n, k, dtype, dev, gated)
    copies = 1 if dev.type == "cpu" else max(2, -(-(256 << 20) // nbytes))
    fns = [fn] + [make_weight(kind, n, k, dtype, dev, gated)[0] for _ in range(copies - 1)]
    x = torch.randn(rows, k, device=dev).to(dtype)
    us = mb.per_call_us([lambda f=f: f(x, cfg) for f in fns], 1 if SMOKE else 5, dev)
    return us, nbytes


def check_kernels(dev, dtype) -> None:
    """The W4A16 kernels against the dequantize-then-matmul reference at one bench shape."""
    from pagedllm.quant import triton_wna16 as wq
    from pagedllm.quant.packing import gptq_dequantize
    k, n = (64, 64) if SMOKE else (4096, 4096)
    qw, qz = random_words((k // 8, n), dev), random_words((k // GROUP, n // 8), dev)
    scales = (torch.rand(k // GROUP, n, device=dev) * 0.02 + 0.005).to(dtype)
    g_idx = (torch.arange(k, device=dev) // GROUP).int()
    ref_w = gptq_dequantize(qw, qz, scales.double(), g_idx, 4, 1)
    for rows in (1, 16):
        x = torch.randn(rows, k, device=dev).to(dtype)
        out = wq.wna16_matmul(x, wq.gptq_weight(qw, qz, scales, g_idx, 4, GROUP, False, 1))
        ref = x.double() @ ref_w
        err = ((out.double() - ref).norm() / ref.norm()).item()
        mb.emit(bench="wna16 check", rows=rows, rel_err=f"{err:.1e}")
        assert err < 1e-2, err


def bench_kernels(args, dev) -> None:
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    check_kernels(dev, dtype)
    kinds = ["bf16", "gptq", "awq"] + (["w4mma", "nf4"] if dev.type == "cuda" else [])
    from pagedllm.quant.kernels import fp8_scaled_mm_supported
    if fp8_scaled_mm_supported(dev):
        kinds.append("fp8")
    fp8_gemv_ok = "fp8" in kinds or dev.type == "cpu"  # CPU: the interpreter runs it
    if args.kinds:  # bf16 stays: the ratios' base
        kinds = ["bf16"] + [k for k in kinds[1:] if k in args.kinds]
        fp8_gemv_ok = fp8_gemv_ok and "fp8_gemv" in args.kinds
    for name, n, k in shapes(TINY if SMOKE else LLAMA):
        for rows in args.rows:
            base_us, base_bytes = time_kind("bf16", n, k, rows, dtype, dev)
            # one row: the Triton GEMVs too (gate_up with its fused SiLU epilogue; bf16 x
            # on CPU as well, the fp8 GEMV takes bf16 / fp16)
            gemvs = ["bf16_gemv", "fp8_gemv"] if rows == 1 and fp8_gemv_ok else []
            if args.kinds:
                gemvs = [k for k in gemvs if k in args.kinds]
            for kind in kinds[1:] + gemvs:
                gemv = kind.endswith("gemv")
                us, nbytes = time_kind(kind, n, k, rows, torch.bfloat16 if gemv else dtype,
                                       dev, gated=gemv and name == "gate_up")
                mb.emit(bench="kernel", shape=name, n=n, k=k, rows=rows, kind=kind,
                        us=round(us, 2), gbs=round(nbytes / us / 1e3, 1),
                        bf16_us=round(base_us, 2),
                        bf16_gbs=round(base_bytes / base_us / 1e3, 1),
                        speedup=round(base_us / us, 2))
            if args.tune:
                tune(name, n, k, rows, dtype, dev)
            if args.tune_w4mma and dev.type == "cuda":
                tune_w4mma(name, n, k, rows, dtype, dev)
            if args.tune_nf4:
                tune_nf4(name, n, k, rows, dtype, dev)
            if args.tune_fp8 and rows == 1 and gemvs:
                best = tune_fp8(name, n, k, dtype, dev)
                if args.apply_tuned and best is not None:  # the engine runs below use it
                    from pagedllm.quant import triton_fp8
                    triton_fp8.FP8_GEMV_CONFIGS[(n, k)] = best


def tune(name, n, k, rows, dtype, dev) -> None:
    """The fastest GEMV (one row) or GEMM tile config of the GPTQ layout at this shape."""
    if rows == 1:  # BLOCK_K stays within a 128 group; the last entry: split-K programs/SM
        cands = [(bn, 128, w, waves) for bn in (32, 64, 128, 256) for w in (2, 4, 8)
                 for waves in (1, 2, 4, 8)]
    else:
        bm = 16 if rows <= 16 else min(64, rows)
        # the last entry: least inputs a split takes per row (the default 64 allows no
        # split at 64 rows; the layout GEMM's sweep found 8 1.9-2.5x faster there)
        cands = [(bm, bn, bk, 4, 3, waves, per_row) for bn in (32, 64, 128)
                 for bk in (64, 128) for waves in (2, 4) for per_row in (8, 64)]
    sweep("gptq", "kernel tune", name, n, k, rows, dtype, dev, cands)


def sweep(kind, bench, name, n, k, rows, dtype, dev, cands) -> None:
    """Time ``kind`` at each tile config of ``cands``; emit the three fastest."""
    if SMOKE:
        cands = cands[:2]
    results = []
    for cfg in cands:
        try:
            results.append((time_kind(kind, n, k, rows, dtype, dev, cfg)[0], cfg))
        except Exception as e:  # too much shared memory / registers for this tile
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}")
    results.sort()
    mb.emit(bench=bench, shape=name, rows=rows,
            top=[(round(us, 2), cfg) for us, cfg in results[:3]])


def tune_nf4(name, n, k, rows, dtype, dev) -> None:
    """The fastest NF4 GEMV (one row: BLOCK_N, BLOCK_K, warps, programs per SM) or GEMM
    (BLOCK_M, BLOCK_N, warps, stages, programs per SM) config at this shape."""
    if rows == 1:
        cands = [(bn, bk, 4, waves) for bn in (32, 64, 128) for bk in (128, 256)
                 for waves in (4, 8)]
    else:
        bm = 16 if rows <= 16 else 64
        cands = [(bm, bn, w, st, waves) for bn in (64, 128) for w in (4, 8)
                 for st in (1, 2, 3) for waves in (1, 2)]
    sweep("nf4", "nf4 tune", name, n, k, rows, dtype, dev, cands)


def tune_w4mma(name, n, k, rows, dtype, dev) -> None:
    """The fastest config of the tensor-core W4A16 layout's route at this shape: one row, the
    register-fragment kernel (``triton_w4mma.CONFIG``: warps, programs per SM, least inputs a
    split, mma chains); 9-511 rows, its GEMM (``_gemm_config``: BLOCK_M / N / K, warps,
    stages, programs per SM split-K aims for, least inputs a split takes per row)."""
    if rows == 1:
        cands = [(w, waves, least, chains) for w in (2, 4) for waves in (4, 8, 16)
                 for least in (256, 512) for chains in (1, 2)]
    elif rows > 8:
        bm = 16 if rows <= 16 else 64
        cands = [(bm, bn, bk, 4, 3, waves, per_row) for bn in (32, 64, 128) for bk in (64, 128)
                 for waves in (2, 4) for per_row in (8, 64)]
    else:
        return
    sweep("w4mma", "w4mma tune", name, n, k, rows, dtype, dev, cands)


def tune_fp8(name, n, k, dtype, dev) -> tuple | None:
    """The fastest (block_n, block_k, num_warps) of the fp8 GEMV at this shape (candidates
    for ``triton_fp8.FP8_GEMV_CONFIGS``): one or two 16-byte vectors a thread a row."""
    cands = [(bn, vecs * 512 * w, w) for bn in (4, 8, 16) for w in (2, 4, 8)
             for vecs in (1, 2) if vecs * 512 * w <= 8192]
    if SMOKE:
        cands = [(2, 64, 1), (4, 32, 1)]
    results = []
    for cfg in cands:
        try:
            results.append((time_kind("fp8_gemv", n, k, 1, torch.bfloat16, dev, cfg,
                                      gated=name == "gate_up")[0], cfg))
        except Exception as e:  # too many registers for this tile
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}")
    results.sort()
    mb.emit(bench="fp8 gemv tune", shape=name, n=n, k=k,
            top=[(round(us, 2), cfg) for us, cfg in results[:3]],
            table=triton_fp8_config(n, k))
    return results[0][1] if results else None


def triton_fp8_config(n: int, k: int) -> tuple:
    from pagedllm.quant import triton_fp8
    return triton_fp8.FP8_GEMV_CONFIGS.get((n, k), triton_fp8.FP8_GEMV_DEFAULT)


def model_dir(fmt: str, base: str) -> str:
    """``base`` with ``fmt``'s quantization_config (a temporary config directory)."""
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = FORMATS[fmt]
    path = tempfile.mkdtemp(prefix=f"quant-bench-{fmt}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def gguf_model(base: str) -> str:
    """A Q4_K_M-typed GGUF file of ``base``'s shape with random blocks (benchmarks/gguf_file.py;
    smoke runs widen the tiny MLP to whole 256-element blocks)."""
    from benchmarks import gguf_file
    folder = tempfile.mkdtemp(prefix="quant-bench-gguf-")
    if SMOKE:
        with open(os.path.join(base, "config.json")) as f:
            cfg = json.load(f)
        cfg["intermediate_size"] = 768
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        base = folder
    return gguf_file.write(base, os.path.join(folder, "model-q4_k_m.gguf"))


def randomize_packed(llm) -> int:
    """Fill the quantized layers' packed int32 words with random bits (dummy loading leaves
    them zero); g_idx stays. In place: captured CUDA graphs keep their pointers."""
    model = llm.llm_engine.worker.runner.model
    filled = 0
    for name, param in model.named_parameters():
        if param.dtype == torch.int32 and not name.endswith("g_idx"):
            param.data.copy_(random_words(param.shape, param.device))
            filled += 1
    return filled


def engine_formats(dev, wanted: list[str]) -> list[str]:
    """``wanted`` in run order (bf16 first: the ratios' base), fp8 only where it runs."""
    from pagedllm.quant.kernels import fp8_scaled_mm_supported
    fp8_ok = dev.type == "cpu" or fp8_scaled_mm_supported(dev)
    return [f for f in ("bf16", "gptq", "awq", "fp8", "nf4", "gguf")
            if f in wanted and (f != "fp8" or fp8_ok)]


def bench_engine(args, dev) -> None:
    from benchmarks.throughput import make_prompts
    base = TINY if SMOKE else LLAMA
    out_len, in_len = (4, 8) if SMOKE else (256, 128)
    rates: dict[tuple[str, str], float] = {}
    for fmt in engine_formats(dev, args.formats):
        model = model_dir(fmt, base) if fmt in FORMATS else base
        flags = dict(quantization="fp8") if fmt == "fp8" else {}
        if fmt == "gguf":  # the file's random blocks are the weights (not dummy-loaded)
            model, flags = gguf_model(base), dict(load_format="gguf")
        llm = mb.make_llm(model, 1024, dev, gpu_memory_utilization=0.9, max_num_seqs=256,
                          **flags)
        filled = randomize_packed(llm)
        for batch in args.batches:
            prompts = make_prompts(batch, in_len, 1000, batch)
            mb.generate(llm, prompts, [4] * batch)  # warm-up at this batch size
            best = min(mb.generate(llm, prompts, [out_len] * batch)[0] for _ in range(2))
            rate = batch * out_len / best
            rates[(fmt, f"b{batch}")] = rate
            ref = rates.get(("bf16", f"b{batch}"))
            mb.emit(bench=f"decode b={batch} {in_len}/{out_len}", format=fmt,
                    tok_s=round(rate, 1), packed_tensors_randomized=filled,
                    vs_bf16=round(rate / ref, 3) if ref else None)
        if args.offline and fmt in ("bf16", "fp8"):
            offline(llm, fmt, rates)
        del llm
        mb.release_memory()


def offline(llm, fmt: str, rates: dict) -> None:
    from benchmarks.throughput import make_prompts
    n, length = (8, 8) if SMOKE else (1000, 256)
    prompts = make_prompts(n, length, 1000, 0)
    elapsed, tokens = mb.generate(llm, prompts, [length] * n)
    rates[(fmt, "offline")] = tokens / elapsed
    mb.emit(bench=f"offline {n} x {length}/{length}", format=fmt,
            output_tok_s=round(tokens / elapsed, 1), seconds=round(elapsed, 2),
            vs_bf16=round(rates[(fmt, "offline")] / rates[("bf16", "offline")], 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=["kernels", "engine"],
                        default=["kernels", "engine"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="kernel kinds to time besides bf16 (default: all that run here: "
                        "gptq awq w4mma nf4 fp8 bf16_gemv fp8_gemv)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--formats", nargs="+", choices=["bf16", "gptq", "awq", "fp8", "nf4", "gguf"],
                        default=["bf16", "gptq", "awq", "fp8"],
                        help="engine formats (bf16 always runs first: the ratios' base)")
    parser.add_argument("--tune", action="store_true", help="sweep the W4A16 tile configs")
    parser.add_argument("--tune-w4mma", action="store_true",
                        help="sweep the tensor-core W4A16 layout's configs (one row: its "
                        "mma kernel; 9-511 rows: its GEMM)")
    parser.add_argument("--tune-nf4", action="store_true",
                        help="sweep the bitsandbytes 4-bit GEMV / GEMM tile configs")
    parser.add_argument("--tune-fp8", action="store_true",
                        help="sweep the one-row fp8 GEMV's configs (triton_fp8)")
    parser.add_argument("--apply-tuned", action="store_true",
                        help="the engine runs of this process use the fp8 GEMV configs the "
                        "--tune-fp8 sweep found (as if committed to FP8_GEMV_CONFIGS)")
    parser.add_argument("--gemm-swap", type=int, choices=[0, 1], default=None,
                        help="triton_wna16.GEMM_SWAP for this process (the W4A16 GEMM up to "
                        "32 rows as W^T x^T, 4-bit tiles decoded in place; default: as "
                        "committed)")
    parser.add_argument("--gguf-q4k-vector", action="store_true",
                        help="GGUF Q4_K layers' one-row GEMV reads whole blocks as 16-byte "
                        "vectors (triton_gguf.Q4K_VECTOR on; default: as committed)")
    parser.add_argument("--no-offline", dest="offline", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: a quick end-to-end "
                        "check of this script (CPU: the Triton interpreter)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="also write JSON here")
    args = parser.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        mb.OUT_FILE = os.path.join(args.out, "quant_bench.jsonl")
    if SMOKE:
        args.rows, args.batches = [1, 4], [1, 2]
    if args.gemm_swap is not None:
        from pagedllm.quant import triton_wna16
        triton_wna16.GEMM_SWAP = bool(args.gemm_swap)
        mb.emit(gemm_swap=triton_wna16.GEMM_SWAP)
    if args.gguf_q4k_vector:
        from pagedllm.quant import triton_gguf
        triton_gguf.Q4K_VECTOR = (True, *triton_gguf.Q4K_VECTOR[1:])
        mb.emit(gguf_q4k_vector=triton_gguf.Q4K_VECTOR)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mb.emit(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            torch=torch.__version__, smoke=SMOKE)
    if "kernels" in args.only:
        bench_kernels(args, dev)
    if "engine" in args.only:
        bench_engine(args, dev)
    mb.table("quant_bench")


if __name__ == "__main__":
    main()
