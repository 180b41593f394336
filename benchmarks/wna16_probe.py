"""Why the one-row W4A16 GEMV reads its int4 bytes at only 0.8-1.5 TB/s (issue 22): the
same Llama-3-8B projections timed as (a) the shipped GEMV (``triton_wna16._gemv``), (b) a
kernel that only loads the same [BLOCK_K / 8, BLOCK_N] word tiles of GPTQ's [K/8, N] layout
and adds them up (the bound of that access pattern), with and without issuing the next
tile's load before using this one, (c) the same load-only kernel on a repacked [N, K/8]
layout (long contiguous rows, as the bf16 GEMV reads), (d) the shipped GEMV's math with
the next tile prefetched, (e) the shipped GEMV on words stored [N, K/8] (compressed-tensors'
layout, read through strides), and (f) a GEMV written for that [N, K/8] layout (a tile of
whole groups along each row, as the bf16 GEMV reads W). CUDA-graph replay over rotating weight copies (L2 holds none);
prints microseconds and GB/s of the int4 words, and the copy bandwidth of the same run.

    python benchmarks/wna16_probe.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.moe_bench import per_call_us  # noqa: E402
from benchmarks.quant_bench import random_words  # noqa: E402
from benchmarks.throughput import copy_bandwidth_gbs  # noqa: E402
from pagedllm.quant import triton_wna16 as wq  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336)]
GROUP = 128


@triton.jit
def _load_only_kernel(qw_ptr, out_ptr, N, KW, kw_split, stride_a, stride_b,
                      TRANSPOSED: tl.constexpr, PREFETCH: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    # sum of the words of a [BLOCK_KW, BLOCK_N] tile per step ([BLOCK_N, BLOCK_KW] of the
    # transposed layout), over this program's K range
    pid_n = tl.program_id(0)
    kw0 = tl.program_id(1) * kw_split
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_KW)
    if TRANSPOSED:
        ptrs = qw_ptr + offs_n[:, None] * stride_a + (kw0 + offs_w)[None, :] * stride_b
        step = BLOCK_KW * stride_b
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)
    else:
        ptrs = qw_ptr + (kw0 + offs_w)[:, None] * stride_a + offs_n[None, :] * stride_b
        step = BLOCK_KW * stride_a
        acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.int32)
    words = tl.load(ptrs, eviction_policy="evict_first")
    for _ in range(0, kw_split - BLOCK_KW, BLOCK_KW):
        ptrs += step
        if PREFETCH:
            nxt = tl.load(ptrs, eviction_policy="evict_first")
            acc += words
            words = nxt
        else:
            acc += words
            words = tl.load(ptrs, eviction_policy="evict_first")
    acc += words
    if TRANSPOSED:
        tl.store(out_ptr + tl.program_id(1) * N + offs_n, tl.sum(acc, axis=1))
    else:
        tl.store(out_ptr + tl.program_id(1) * N + offs_n, tl.sum(acc, axis=0))


@triton.jit
def _gemv_prefetch_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, part_ptr, N, k_split, group_size,
                          magic, stride_qk, stride_zg, stride_sg,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # the shipped GEMV's grouped path (4-bit, zeros, no act-order, K and N multiples of the
    # tile) with the next word tile loaded before this one's products
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_split
    ptrs = qw_ptr + (k_start // 8 + rows)[:, None] * stride_qk + offs_n[None, :]
    words = tl.load(ptrs, eviction_policy="evict_first")
    for k0 in range(k_start, k_start + k_split, BLOCK_K):
        nxt = tl.load(ptrs + (BLOCK_K // 8) * stride_qk,
                      mask=k0 + BLOCK_K < k_start + k_split, other=0,
                      eviction_policy="evict_first")
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n).to(tl.float32)
        zw = tl.load(qz_ptr + g * stride_zg + offs_n // 8)
        z = (((zw >> ((offs_n % 8) * 4)) & 15) + 1).to(tl.float32)
        qx = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        hi_words = words >> wq._hi_shift(4)
        for j in tl.static_range(8):
            k = k0 + rows * 8 + j
            xj = tl.load(x_ptr + k).to(tl.float32)
            qx += wq._code_at(words, hi_words, magic, j, 4) * (xj * wq._code_scale(j, 4))[:, None]
            x_sum += xj
        acc += (qx - z[None, :] * x_sum[:, None]) * s[None, :]
        words = nxt
        ptrs += (BLOCK_K // 8) * stride_qk
    tl.store(part_ptr + pid_s * N + offs_n, tl.sum(acc, axis=0))


@triton.jit
def _row_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, part_ptr, N, kw_split, magic, stride_qn,
                     stride_zg, stride_sg, GW: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_KW: tl.constexpr):
    # words stored [N, K/8] (row n's K contiguous, as the bf16 GEMV reads W): a [BLOCK_N,
    # BLOCK_KW] tile of words, BLOCK_KW // GW whole groups a row; 4-bit, GPTQ zeros (+1)
    NG: tl.constexpr = BLOCK_KW // GW
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    kw0 = pid_s * kw_split
    zshift = ((offs_n % 8) * 4)[:, None]
    for c0 in range(kw0, kw0 + kw_split, BLOCK_KW):
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (c0 + offs_c)[None, :],
                        eviction_policy="evict_first")
        hi_words = words >> wq._hi_shift(4)
        qx = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        xs = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + (c0 + offs_c) * 8 + j).to(tl.float32)
            qx += wq._code_at(words, hi_words, magic, j, 4) * (xj * wq._code_scale(j, 4))[None, :]
            xs += xj
        qg = tl.sum(tl.reshape(qx, (BLOCK_N, NG, GW)), axis=2)
        xg = tl.sum(tl.reshape(xs, (NG, GW)), axis=1)
        g = c0 // GW + tl.arange(0, NG)
        sc = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None]).to(tl.float32)
        zw = tl.load(qz_ptr + g[None, :] * stride_zg + (offs_n // 8)[:, None])
        z = (((zw >> zshift) & 15) + 1).to(tl.float32)
        acc += sc * (qg - z * xg[None, :])
    tl.store(part_ptr + pid_s * N + offs_n, tl.sum(acc, axis=1))


def even_splits(kw: int, block_kw: int, tiles: int, waves: int) -> int:
    """Splits of K's kw words into whole tiles of block_kw, about waves x 132 programs."""
    splits = max(1, min(kw // block_kw, triton.cdiv(waves * 132, tiles)))
    while (kw // block_kw) % splits:
        splits -= 1
    return splits


def load_only(n: int, k: int, dev, transposed: bool, prefetch: bool, block_n: int,
              block_kw: int, waves: int):
    """A callable per weight copy that runs the load-only kernel, and the word bytes."""
    kw = k // 8
    tiles = n // block_n
    splits = even_splits(kw, block_kw, tiles, waves)
    kw_split = kw // splits
    out = torch.empty(splits, n, dtype=torch.int32, device=dev)

    def make():
        w = random_words((n, kw) if transposed else (kw, n), dev)
        return lambda: _load_only_kernel[(tiles, splits)](
            w, out, n, kw, kw_split, w.stride(0), w.stride(1), TRANSPOSED=transposed,
            PREFETCH=prefetch, BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=4)
    return make, n * kw * 4


def gptq_problem(n: int, k: int, dev, transposed: bool = False):
    """A random GPTQ weight; ``transposed``: its words stored [N, K/8] (the [K/8, N] view the
    kernels get has strides (1, K/8), as compressed-tensors' ``weight_packed``)."""
    scales = (torch.rand(k // GROUP, n, device=dev) * 0.02 + 0.005).to(torch.bfloat16)
    qw = random_words((n, k // 8), dev).t() if transposed else random_words((k // 8, n), dev)
    qz = random_words((k // GROUP, n // 8), dev)
    return wq.gptq_weight(qw, qz, scales, None, 4, GROUP, False, 1)


def prefetch_gemv(w, x, block_n: int, block_k: int, waves: int):
    tiles = w.n // block_n
    splits, k_split = wq._splits(tiles, w.k, block_k, waves * 132)
    part = torch.empty(splits, w.n, dtype=torch.float32, device=x.device)
    _gemv_prefetch_kernel[(tiles, splits)](
        x, w.qweight, w.qzeros, w.scales, part, w.n, k_split, GROUP, wq.MAGIC,
        w.qweight.stride(0), w.qzeros.stride(0), w.scales.stride(0), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4)
    return part


def row_gemv(w, x, block_n: int, block_kw: int, waves: int):
    """The [N, K/8] GEMV on a ``gptq_problem(..., transposed=True)`` weight (fp32 split sums)."""
    tiles, kw = w.n // block_n, w.k // 8
    splits = even_splits(kw, block_kw, tiles, waves)
    part = torch.empty(splits, w.n, dtype=torch.float32, device=x.device)
    words = w.qweight.t()
    _row_gemv_kernel[(tiles, splits)](
        x, words, w.qzeros, w.scales, part, w.n, kw // splits, wq.MAGIC, words.stride(0),
        w.qzeros.stride(0), w.scales.stride(0), GW=GROUP // 8, BLOCK_N=block_n,
        BLOCK_KW=block_kw, num_warps=4)
    return part


def timed(make, nbytes: int, dev) -> tuple[float, float]:
    copies = max(2, -(-(256 << 20) // nbytes))
    us = per_call_us([make() for _ in range(copies)], 5, dev)
    return us, nbytes / us / 1e3


def probe_shape(name: str, n: int, k: int, dev, rows: list) -> None:
    x = torch.randn(1, k, device=dev).to(torch.bfloat16)
    nbytes = n * k // 2
    weights = [gptq_problem(n, k, dev) for _ in range(max(2, -(-(256 << 20) // nbytes)))]
    ref = wq.wna16_matmul(x, weights[0]).float()
    got = prefetch_gemv(weights[0], x, 64, 128, 8).sum(0)
    err = (got - ref[0]).abs().max().item() / ref.abs().max().item()
    for cfg in [(64, 128, 4, 8), (128, 128, 4, 8), (256, 128, 8, 4)]:
        us = per_call_us([lambda w=w: wq.wna16_matmul(x, w, config=cfg) for w in weights], 5,
                         dev)
        rows.append((name, f"shipped {cfg}", us, nbytes / us / 1e3))
    for cfg in [(64, 128, 8), (128, 128, 8), (256, 128, 4)]:
        us = per_call_us([lambda w=w: prefetch_gemv(w, x, *cfg) for w in weights], 5, dev)
        rows.append((name, f"prefetch {cfg} (rel err {err:.1e})", us, nbytes / us / 1e3))
    del weights
    weights = [gptq_problem(n, k, dev, True) for _ in range(max(2, -(-(256 << 20) // nbytes)))]
    for cfg in [(16, 128, 4, 8), (32, 128, 4, 8), (64, 128, 4, 8), (128, 128, 8, 4)]:
        us = per_call_us([lambda w=w: wq.wna16_matmul(x, w, config=cfg) for w in weights], 5,
                         dev)
        rows.append((name, f"shipped on [N,K/8] words {cfg}", us, nbytes / us / 1e3))
    ref = wq.wna16_matmul(x, weights[0]).float()
    got = row_gemv(weights[0], x, 8, 64, 4).sum(0)
    err = (got - ref[0]).abs().max().item() / ref.abs().max().item()
    for cfg in [(4, 128, 4), (8, 64, 4), (8, 128, 2), (16, 64, 2), (4, 256, 2), (8, 256, 1)]:
        us = per_call_us([lambda w=w: row_gemv(w, x, *cfg) for w in weights], 5, dev)
        rows.append((name, f"row GEMV [N,K/8] {cfg} (rel err {err:.1e})", us,
                     nbytes / us / 1e3))
    del weights
    for transposed, prefetch, bn, bkw, waves in [
            (False, False, 64, 16, 8), (False, True, 64, 16, 8), (False, False, 256, 16, 4),
            (False, True, 256, 16, 4), (False, True, 256, 64, 2), (True, False, 16, 128, 2),
            (True, True, 16, 128, 2), (True, True, 4, 256, 4), (True, True, 8, 512, 1)]:
        if n % bn or (k // 8) % bkw:
            continue
        make, wbytes = load_only(n, k, dev, transposed, prefetch, bn, bkw, waves)
        us, gbs = timed(make, wbytes, dev)
        rows.append((name, f"load-only {'[N,K/8]' if transposed else '[K/8,N]'} "
                     f"prefetch={int(prefetch)} tile {bn}x{bkw} waves {waves}", us, gbs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--ncu", action="store_true", help="only a few plain calls of the "
                        "shipped GEMV on gate_up (for `ncu -k regex:wna16_gemv`)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    if args.ncu:
        w, x = gptq_problem(28672, 4096, dev), torch.randn(1, 4096, device=dev).bfloat16()
        for _ in range(3):
            wq.wna16_matmul(x, w)
        torch.cuda.synchronize()
        return
    rows: list = []
    copy = copy_bandwidth_gbs(dev)
    print(f"copy bandwidth {copy:.0f} GB/s")
    for name, n, k in SHAPES:
        probe_shape(name, n, k, dev, rows)
        for row in rows:
            if row[0] == name:
                print(f"{row[0]:8s} {row[1]:58s} {row[2]:8.1f} us {row[3]:7.0f} GB/s "
                      f"({row[3] / copy:.2f} of copy)", flush=True)
    if args.out:
        with open(os.path.join(args.out, "wna16_probe.json"), "w") as f:
            json.dump({"copy_gbs": copy, "rows": rows}, f)


if __name__ == "__main__":
    main()
