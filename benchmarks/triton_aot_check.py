"""Compile the quantized-matmul and fused-MoE Triton kernels for sm_90 (H100 / H200) without
a GPU, and print each variant's resource report: registers, stack (spills), shared memory,
and the SASS instruction mix that matters (HGMMA / HMMA matrix instructions, LDL / STL local
memory, global-load widths, cp.async LDGSTS, barriers). Costs no device time: run it before
a device call to catch compile errors and spills.

Arguments are specialised as the JIT does at run time: pointers and the strides / sizes
named below 16-divisible, the unit strides of the usual layouts constant 1.

    python benchmarks/triton_aot_check.py            # every kernel variant in use
    python benchmarks/triton_aot_check.py --only moe
    python benchmarks/triton_aot_check.py --only fp8   # the fp8 batch-1 GEMV's variants
    python benchmarks/triton_aot_check.py --only mla --sweep   # MLA decode tile shapes too
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pagedllm.attention import triton_mla as tm  # noqa: E402
from pagedllm.layers import fused_moe_triton as fm  # noqa: E402
from pagedllm.quant import triton_fp8 as tf  # noqa: E402
from pagedllm.quant import triton_wna16 as wq  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DIVISIBLE = ("N", "K", "k_split", "group_size", "up_offset")
OPS = r"\b(HGMMA|HMMA|LDL|STL|LDGSTS[.\w]*|LDG[.\w]*|STG[.\w]*|BAR)\b"


def build(jit_fn, types: dict, constexprs: dict, unit=(), **options):
    """The compiled sm_90 kernel of one variant."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    constexprs = {**{n: 1 for n in unit}, **constexprs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride")
                                         or n in DIVISIBLE)}
    src = ASTSource(fn=jit_fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=TARGET, options=options)


def compile_kernel(jit_fn, types: dict, constexprs: dict, unit=(), **options) -> str:
    """One line: the variant, its registers / stack / shared memory and SASS mix."""
    kernel = build(jit_fn, types, constexprs, unit, **options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                          capture_output=True, text=True).stdout
    os.unlink(f.name)
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    mix = dict(collections.Counter(re.findall(OPS, sass)).most_common())
    shown = {k: v for k, v in constexprs.items() if k not in unit}
    line = (f"{jit_fn.fn.__name__} {shown} {options}: REG {res[1]} STACK {res[2]} "
            f"SHARED {kernel.metadata.shared} {mix}")
    if re.search(r"convert_layout %\S+ : tensor<[^>]*xf8E4M3FN", kernel.asm["ttgir"]):
        line += " FP8-TILE-THROUGH-SHARED-MEMORY"  # a layout conversion of an e4m3 tile
    return line


def moe_variants() -> list[str]:
    types = {"ids_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32",
             "num_padded_ptr": "*i32", "a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
             "topw_ptr": "*fp32"}
    lines = [compile_kernel(fm._align_kernel, types, dict(BLOCK_M=16, E_POW2=128, CHUNK=64),
                            num_warps=4)]
    route = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i64",
             "scale": "fp32"}
    for experts, sigmoid, groups, topk_group, warps in [(128, False, 1, 1, 1),
                                                         (256, True, 8, 4, 2)]:
        lines.append(compile_kernel(
            fm._route_kernel, route,
            dict(TOP_K=8, K_POW2=8, RENORM=True, E_POW2=experts, SIGMOID=sigmoid,
                 HAS_BIAS=sigmoid, GROUPS=groups, TOPK_GROUP=topk_group, BY_TOP2=sigmoid,
                 USE_PDL=True), num_warps=warps))
    types["s_ptr"] = "*fp32"
    types["logits_ptr"], types["bias_ptr"], types["scale"] = "*bf16", "*fp32", "fp32"
    int8 = {**types, "w_ptr": "*i8"}  # experts_int8: codes with a scale per row
    plain = fm.Router().constexprs(1)
    for scaled in (False, True):
        for gated, (bn, bk, warps) in zip((True, False), fm.MOE_GEMV_CONFIGS):
            for routed in (False, True) if gated else (False,):  # routing in the gate/up
                route = fm.Router(renormalize=True).constexprs(128) if routed else plain
                lines.append(compile_kernel(
                    fm._moe_gemv_kernel, int8 if scaled else types,
                    dict(TOP_K=8, K_POW2=8, GATED=gated, SCALED=scaled, BLOCK_N=bn,
                         BLOCK_K=bk, VEC=16 if scaled else 8, ROUTED=routed, **route,
                         USE_PDL=True), num_warps=warps))
    lines.append(compile_kernel(
        fm._norm_router_kernel, {"x_ptr": "*bf16", "res_ptr": "*bf16", "norm_w_ptr": "*bf16",
                                 "w_ptr": "*bf16", "sum_ptr": "*bf16", "xn_ptr": "*bf16",
                                 "logits_ptr": "*bf16", "eps": "fp32", "offset": "fp32"},
        dict(BLOCK_E=1, BLOCK_H=2048, USE_PDL=True), num_warps=8))
    configs = {c for _, gate_up, down in fm.MOE_CONFIGS for c in (gate_up, down)}
    for bm, bn, bk, warps, stages in sorted(configs):
        for gated, scaled in ((True, False), (False, False), (True, True)):
            lines.append(compile_kernel(
                fm._moe_gemm_kernel, int8 if scaled else types,
                dict(A_ROW_DIV=8 if gated else 1, GATED=gated, WEIGHTED=not gated,
                     SCALED=scaled, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                num_warps=warps, num_stages=stages))
    return lines


def wna16_variants() -> list[str]:
    types = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16",
             "g_ptr": "*i32", "out_ptr": "*fp32"}
    unit = ("stride_qn", "stride_sn", "stride_zn")  # GPTQ / repacked AWQ layouts
    fp8_types = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                 "peak_ptr": "*fp32"}
    lines = [compile_kernel(tf._peak_kernel, fp8_types, dict(BLOCK=2048), num_warps=4)]
    lines += [compile_kernel(tf._quant_fp8_kernel, fp8_types,
                             dict(PER_TENSOR=per_tensor, PEAKS=tf.PEAK_PROGRAMS, BLOCK=2048),
                             num_warps=4) for per_tensor in (True, False)]
    lines.append(compile_kernel(wq._splitk_reduce_kernel, {"part_ptr": "*fp32",
                                                           "bias_ptr": "*bf16",
                                                           "out_ptr": "*bf16"},
                                dict(HAS_BIAS=False, GATED=True, BLOCK=1024), ("stride_om",),
                                num_warps=4))
    lines.append(compile_kernel(
        wq._dequant_kernel, {**types, "out_ptr": "*bf16"},
        dict(BITS=4, AWQ=False, ACT_ORDER=False, HAS_ZEROS=True, BLOCK_K=64, BLOCK_N=64),
        unit, num_warps=4))
    block_n, block_k, warps = wq.GEMV_CONFIG
    gemv_types = {**types, "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
                  "bias_ptr": "*bf16"}
    for bits, act, zeros, fold, gated, even, pairs in [
            (4, False, True, True, False, True, True), (4, False, True, True, True, True, True),
            (4, False, True, True, False, False, True), (4, False, True, False, False, True, False),
            (4, True, True, True, False, False, False), (8, False, False, True, False, True, True)]:
        lines.append(compile_kernel(
            wq._wna16_gemv_kernel, {**gemv_types, "x_ptr": "*i32" if pairs else "*bf16"},
            dict(BITS=bits, ACT_ORDER=act, HAS_ZEROS=zeros, FOLD=fold, HAS_BIAS=False,
                 GATED=gated, GROUP=128, EVEN=even, X_PAIRS=pairs, BLOCK_N=block_n,
                 BLOCK_K=block_k, USE_PDL=True), unit, num_warps=warps))
    for _, bm, bn, bk, warps, stages, *_ in wq.GEMM_CONFIGS:
        for bits, awq, act, zeros in [(4, False, False, True), (4, True, False, True),
                                      (4, False, True, True), (8, False, False, False)]:
            lines.append(compile_kernel(
                wq._wna16_gemm_kernel, {**types, "out_ptr": "*bf16"},
                dict(BITS=bits, AWQ=awq, ACT_ORDER=act, HAS_ZEROS=zeros, IEEE=False,
                     SWAP=bm <= wq.SWAP_MAX_BLOCK_M,
                     FAST=bm <= wq.SWAP_MAX_BLOCK_M and bits == 4 and not awq and not act,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                unit, num_warps=warps, num_stages=stages))
    return lines


def nf4_variants(configs=None) -> list[str]:
    """``triton_nf4``: the GEMV (plain, gated, masked) at the default config or ``configs``,
    and the dequantize kernel."""
    from pagedllm.quant import triton_nf4 as nf4
    types = {"x_ptr": "*bf16", "w_ptr": "*i32", "a_ptr": "*fp32", "code_ptr": "*fp32",
             "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "bias_ptr": "*bf16"}
    lines = [compile_kernel(nf4._nf4_dequant_kernel, {**types, "w_ptr": "*u8"},
                            dict(BLOCK_N=32, BLOCK_K=128), num_warps=4)]
    block_m, block_n, warps, stages, _ = nf4.GEMM_CONFIG
    for bm in sorted({block_m, 64}):
        lines.append(compile_kernel(nf4._nf4_gemm_kernel, {**types, "w_ptr": "*u8"},
                                    dict(IEEE=False, BLOCK_M=bm, BLOCK_N=block_n),
                                    num_warps=warps, num_stages=stages))
    for block_n, block_k, warps in configs or [nf4.GEMV_CONFIG]:
        for gated, even in [(False, True), (True, True), (False, False)]:
            lines.append(compile_kernel(
                nf4._nf4_gemv_kernel, types,
                dict(FOLD=True, HAS_BIAS=False, GATED=gated, EVEN=even, BLOCK_N=block_n,
                     BLOCK_K=block_k, USE_PDL=True), num_warps=warps))
    return lines


def gguf_variants() -> list[str]:
    """``triton_gguf``'s dequantize kernel and GEMV for each block type it covers."""
    from pagedllm.quant import triton_gguf as tgg
    lines = []
    for code, elements, size, subs, length in tgg.KINDS.values():
        lines.append(compile_kernel(tgg._gguf_dequant_kernel, {"w_ptr": "*u8", "out_ptr": "*bf16"},
                                    dict(SIZE=size, S=subs, L=length, KIND=code,
                                         BLOCK_R=8 if elements == 256 else 32), num_warps=4))
        lines.append(compile_kernel(tgg._gguf_gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*u8",
                                                            "part_ptr": "*fp32"},
                                    dict(SIZE=size, S=subs, L=length, KIND=code,
                                         BLOCK_R=tgg.GEMV_BLOCK_R), num_warps=4))
    for block_r, warps in [(8, 2), (16, 4), (16, 2), (32, 8), (64, 8)]:  # the Q4_K vector GEMV
        lines.append(compile_kernel(tgg._q4k_gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*i32",
                                                           "part_ptr": "*fp32"},
                                    dict(BLOCK_R=block_r), num_warps=warps))
    return lines


def fp8_gemv_variants() -> list[str]:
    """``triton_fp8._fp8_gemv_kernel`` at each tuned config and the default: every
    activation mode, plain and gated (+ bias), K a multiple of the block (the real shapes)."""
    types = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "rs_ptr": "*fp32", "xs_ptr": "*fp32",
             "b_ptr": "*bf16", "out_ptr": "*bf16"}
    lines = []
    configs = sorted({*tf.FP8_GEMV_CONFIGS.values(), tf.FP8_GEMV_DEFAULT})
    for block_n, block_k, warps in configs:
        for act, gated in [(0, False), (1, False), (2, False), (2, True)]:
            lines.append(compile_kernel(
                tf._fp8_gemv_kernel, types,
                dict(ACT=act, HAS_BIAS=gated, GATED=gated, EVEN_K=True, BLOCK_N=block_n,
                     BLOCK_K=block_k, VEC=16, PEAK_BLOCK=2 * block_k, USE_PDL=True),
                num_warps=warps))
    return lines


def mla_variants(sweep: bool = False) -> list[str]:
    """The MLA decode kernel at DeepSeek-V2/V3 shapes (rank 512 + rope 64; 16 and 128 heads
    a rank) with the configs ``mla_decode_config`` picks (``sweep``: the other BLOCK_H /
    BLOCK_N / warp counts too), one split, folded splits and reduced splits, and the latent
    write."""
    types = {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32",
             "q_ptr": "*bf16", "cache_ptr": "*bf16", "block_table_ptr": "*i32",
             "seq_lens_ptr": "*i32", "count_ptr": "*i32", "qk_scale": "fp32"}
    fp32 = {**types, "out_ptr": "*fp32", "q_ptr": "*fp32", "cache_ptr": "*fp32"}
    lines = []
    configs = {(dtype, tm.mla_decode_config(heads, 512, dtype))
               for heads in (16, 128) for dtype in (torch.bfloat16, torch.float32)}
    if sweep:
        configs |= {(torch.bfloat16, (bh, bn, w, 2)) for bh in (16, 32, 64)
                    for bn in (16, 32, 64) for w in (4, 8)}
    for dtype, (block_h, block_n, warps, stages) in sorted(configs, key=str):
        for splits, fold in ((1, False), (8, True), (16, False)):
            lines.append(compile_kernel(
                tm._mla_decode_kernel, types if dtype == torch.bfloat16 else fp32,
                dict(RANK=512, ROPE=64, BLOCK_R=512, BLOCK_P=64, BLOCK_H=block_h,
                     BLOCK_N=block_n, BLOCK_SIZE=16, NUM_SPLITS=splits,
                     SPLITS_P2=splits, MIN_TILES=tm.MIN_SPLIT_TILES,
                     DOT_PRECISION="tf32" if dtype == torch.bfloat16
                     else "ieee", FOLD=fold, USE_PDL=True),
                num_warps=warps, num_stages=stages))
    for splits in (16, 64):
        lines.append(compile_kernel(
            tm._mla_reduce_kernel, types, dict(NUM_SPLITS=splits, SPLITS_P2=splits, RANK=512,
                                               BLOCK_R=tm.REDUCE_BLOCK_R, USE_PDL=True),
            num_warps=4))
    lines.append(compile_kernel(tm._write_latent_kernel, {"cache_ptr": "*bf16",
                                                          "latent_ptr": "*bf16",
                                                          "slot_mapping_ptr": "*i64"},
                                dict(DIM=576, BLOCK_D=1024, USE_PDL=True), num_warps=4))
    return lines


def attention_variants() -> list[str]:
    """The paged decode kernel at the Qwen3-30B-A3B shape (8 query heads a KV head, head_dim
    128, q/k norms), folded splits, without and with the rotary + KV write inside (ROPE)."""
    from pagedllm.attention import triton_attention as ta
    types = {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32",
             "q_ptr": "*bf16", "kv_ptr": "*bf16", "block_table_ptr": "*i32",
             "seq_lens_ptr": "*i32", "count_ptr": "*i32", "k_new_ptr": "*bf16",
             "v_new_ptr": "*bf16", "slot_ptr": "*i64", "pos_ptr": "*i64", "cos_ptr": "*fp32",
             "sin_ptr": "*fp32", "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16",
             "qk_scale": "fp32", "cap_scale": "fp32", "v_scale": "fp32", "eps": "fp32",
             "inv_k_scale": "fp32", "inv_v_scale": "fp32"}
    lines = []
    # (group, splits, rope, q/k norms, fp8 cache): Qwen3-30B-A3B, Llama-3-8B (4 heads a KV
    # head, 16 splits reduced by a second launch), Llama with an fp8 cache
    for group, splits, rope, qk_norm, fp8 in [(8, 4, False, False, False),
                                              (8, 4, True, True, False),
                                              (4, 16, True, False, False),
                                              (4, 16, True, False, True)]:
        kv_types = {**types, "kv_ptr": "*fp8e4nv"} if fp8 else types
        lines.append(compile_kernel(
            ta._paged_decode_kernel, kv_types,
            dict(GROUP=group, BLOCK_H=16, BLOCK_N=64, BLOCK_SIZE=16, HEAD_DIM=128,
                 BLOCK_D=128, NUM_SPLITS=splits, USE_WINDOW=False, USE_SOFT_CAP=False,
                 DOT_PRECISION="tf32", FOLD=group == 8, GROUP_P2=group, SPLITS_P2=splits,
                 ROPE=rope, HALF=64, QK_NORM=qk_norm, FP8_MAX=448 if fp8 else 0,
                 USE_PDL=True), num_warps=4, num_stages=3))
    return lines


def w4mma_variants() -> list[str]:
    """The tensor-core W4A16 kernel at each token-tile count, bf16 and fp16, folded and not,
    and its dequantize kernel."""
    from pagedllm.quant import triton_w4mma as w4
    types = {"x_ptr": "*i32", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16",
             "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "bias_ptr": "*bf16"}
    lines = []
    for tiles, fp16, fold, gated, chains in [
            (1, False, True, False, 1), (1, False, True, True, 1), (1, True, True, False, 1),
            (1, False, True, False, 2), (1, True, True, False, 2), (2, False, True, False, 1),
            (4, False, True, True, 1), (8, False, True, False, 1), (8, False, False, False, 1)]:
        lines.append(compile_kernel(
            w4._w4mma_kernel, {**types, "s_ptr": "*fp16" if fp16 else "*bf16"},
            dict(GROUP=128, HAS_ZEROS=True, FOLD=fold, HAS_BIAS=False, GATED=gated,
                 TILES=tiles, FP16=fp16, WARPS=w4.CONFIG[0], CHAINS=chains, EMULATE=False,
                 USE_PDL=True),
            num_warps=w4.CONFIG[0]))
    for bm, bn, bk, warps, stages in [(16, 64, 128, 4, 3), (32, 32, 128, 4, 3),
                                      (64, 64, 128, 4, 3), (64, 128, 64, 8, 3)]:
        lines.append(compile_kernel(
            w4._gemm_kernel, {**types, "x_ptr": "*bf16", "out_ptr": "*fp32"},
            dict(GROUP=128, HAS_ZEROS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
            num_warps=warps, num_stages=stages))
    lines.append(compile_kernel(w4._dequant_kernel, {**types, "out_ptr": "*bf16"},
                                dict(GROUP=128, HAS_ZEROS=True, BLOCK=256), num_warps=4))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["moe", "wna16", "fp8", "mla", "nf4", "gguf", "w4mma",
                                           "attention"],
                        nargs="+",
                        default=["moe", "wna16", "fp8", "mla"])
    parser.add_argument("--sweep", action="store_true",
                        help="mla: other tile shapes than the ones in use too")
    args = parser.parse_args()
    parts = {"moe": moe_variants, "wna16": wna16_variants, "fp8": fp8_gemv_variants,
             "mla": lambda: mla_variants(args.sweep), "nf4": nf4_variants, "gguf": gguf_variants,
             "w4mma": w4mma_variants, "attention": attention_variants}
    for part in args.only:
        for line in parts[part]():
            print(line, flush=True)


if __name__ == "__main__":
    main()
