"""Time the Triton attention kernels against the PyTorch reference on one GPU, and check them.

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, block 16, bf16):
KV-cache write of 256 and 1024 tokens; decode at batch 1/64/256 and context 512/2048; prefill
of one 1024-token prompt (and one 512-token chunk after a 1536-token cached prefix). MLA
decode (``triton_mla``) at DeepSeek-V2/V3 shapes: latent rank 512 + rope 64, 128 query heads
(one GPU) and 16 (V2-Lite, or V3 at tensor-parallel size 8), batch 1/16/64, context 1024/8192,
against the torch path (``mla.mla_decode_attention_ref``: SDPA over gathered latents).

For each case: correctness against the reference run in fp32 on upcast inputs (||out - ref|| /
||ref|| under 1e-2, output poisoned with NaN first), then the median of ``--iters`` timed runs
(CUDA events around the call only, L2 flushed before each run, after ``--warmup`` runs) of the
kernel launched eagerly, of its CUDA-graph replay (decode, which also proves it capturable),
and of the bf16 torch reference. The rate column uses the graph time: decode and write in GB/s
of the bytes they must move (compare with the copy bandwidth printed first), prefill in
TFLOP/s of the causal attention products.

    python benchmarks/gpu_kernels.py                     # all cases
    python benchmarks/gpu_kernels.py --only decode --sweep-splits 1 2 4 8 16
    python benchmarks/gpu_kernels.py --only mla --sweep-splits 1 4 16 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
TOL = 1e-2
WRITE_TOKENS = (256, 1024)
DECODE_BATCHES, DECODE_CONTEXTS = (1, 64, 256), (512, 2048)
PREFILL_SHAPES = ((0, 1024), (1536, 512))  # (cached context, new tokens) of one sequence
MLA_RANK, MLA_ROPE, MLA_HEADS = 512, 64, (128, 16)
MLA_BATCHES, MLA_CONTEXTS = (1, 16, 64), (1024, 8192)
DEVICE = "cuda"


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50, help="timed runs per variant (median)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    p.add_argument("--only", choices=["write", "decode", "prefill", "mla"], default=None,
                   help="run one kernel's cases only")
    p.add_argument("--sweep-splits", type=int, nargs="*", default=None,
                   help="also time decode / mla at these explicit num_splits values")
    p.add_argument("--no-reference-timing", action="store_true",
                   help="skip timing the torch reference (correctness is still checked)")
    return p.parse_args()


class Timer:
    """Median GPU time of a callable: events around the call only, L2 flushed before each."""

    def __init__(self, iters: int, warmup: int) -> None:
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # us


def _graph(fn):
    """Capture ``fn`` in a CUDA graph (raises if it syncs or allocates shapes from values)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _copy_bandwidth(timer: Timer) -> float:
    src = torch.randn(2**28, device=DEVICE)  # 1 GiB
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / us / 1e3  # GB/s, read + write


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _paged_cache(seq_lens: list[int], gen: torch.Generator):
    """Random bf16 cache holding every sequence in shuffled blocks; block table int32."""
    need = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(need) + 16
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n]
        used += n
    kv = torch.randn(2, num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen,
                     device=DEVICE, dtype=DTYPE)
    return kv, table


def _row(name, err, us, graph_us, ref_us, rate, unit, extra=""):
    ok = "ok" if err == err and err < TOL else "FAIL"
    g = f"{graph_us:9.1f}" if graph_us is not None else f"{'-':>9}"
    r = f"{ref_us:9.1f}" if ref_us is not None else f"{'-':>9}"
    x = f"{ref_us / us:6.1f}x" if ref_us is not None else f"{'-':>7}"
    return (f"{name:<30} {us:9.1f} {g} {r} {x} {rate:9.1f} {unit:<7} {err:8.1e} {ok:<4} "
            f"{extra}")


def bench_write(ta, timer, args, gen) -> list[str]:
    from pagedllm.attention.torch_ref import write_kv_cache as torch_write
    rows = []
    for num_tokens in WRITE_TOKENS:
        kv = torch.randn(2, 4 * num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen,
                         device=DEVICE, dtype=DTYPE)
        k, v = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=DEVICE,
                            dtype=DTYPE) for _ in range(2))
        slots = torch.randperm(kv.shape[1], generator=gen, device=DEVICE)[:num_tokens]
        slots[::7] = -1
        ref = kv.clone()
        ta.write_kv_cache_ref(ref, k, v, slots)
        ta.write_kv_cache(kv, k, v, slots)
        err = 0.0 if torch.equal(kv, ref) else float("nan")
        us = timer(lambda: ta.write_kv_cache(kv, k, v, slots))
        g_us = timer(_graph(lambda: ta.write_kv_cache(kv, k, v, slots)))
        keep = slots.clamp_min(0)  # the torch path has no skip; time it on valid slots
        ref_us = None if args.no_reference_timing else timer(lambda: torch_write(kv, k, v, keep))
        gbs = 4 * k.numel() * k.element_size() / g_us / 1e3
        rows.append(_row(f"write tokens={num_tokens}", err, us, g_us, ref_us, gbs, "GB/s"))
    return rows


def bench_decode(ta, timer, args, gen) -> list[str]:
    rows = []
    scale = HEAD_DIM ** -0.5
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            kv, table = _paged_cache([ctx] * batch, gen)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE,
                            dtype=DTYPE)
            kw = dict(scale=scale, block_size=BLOCK_SIZE)
            ref = ta.paged_attention_decode_ref(q.float(), kv.float(), table, lens, **kw)
            kv_elems = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM  # K and V read once
            nbytes = (kv_elems + 2 * q.numel()) * q.element_size()
            ref_us = None if args.no_reference_timing else \
                timer(lambda: ta.paged_attention_decode_ref(q, kv, table, lens, **kw))
            for splits in [None] + list(args.sweep_splits or []):
                out = torch.full_like(q, float("nan"))
                ta.paged_attention_decode(q, kv, table, lens, out=out, num_splits=splits, **kw)
                err = _rel_err(out, ref)

                def call(splits=splits, out=out):
                    ta.paged_attention_decode(q, kv, table, lens, out=out, num_splits=splits,
                                              **kw)
                us = timer(call)
                g_us = timer(_graph(call))
                name = f"decode b={batch} ctx={ctx}" + (f" s={splits}" if splits else "")
                auto = ta.decode_num_splits(batch, NUM_KV_HEADS, table.shape[1], BLOCK_SIZE,
                                            HEAD_DIM, q.device)
                extra = "" if splits else f"splits={auto}"
                rows.append(_row(name, err, us, g_us, ref_us, nbytes / g_us / 1e3, "GB/s",
                                 extra))
            kv = ref = None  # free the big cache before the next shape
            torch.cuda.empty_cache()
    return rows


def bench_prefill(ta, timer, args, gen) -> list[str]:
    rows = []
    scale = HEAD_DIM ** -0.5
    for ctx, num_new in PREFILL_SHAPES:
        seq_len = ctx + num_new
        kv, table = _paged_cache([seq_len], gen)
        lens = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
        starts = torch.tensor([0, num_new], dtype=torch.int32, device=DEVICE)
        q = torch.randn(num_new, NUM_HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
        kw = dict(scale=scale, block_size=BLOCK_SIZE)
        ref = ta.paged_attention_prefill_ref(q.float(), kv.float(), table, lens, starts, **kw)
        out = torch.full_like(q, float("nan"))
        ta.paged_attention_prefill(q, kv, table, lens, starts, out=out, max_query_len=num_new,
                                   **kw)
        err = _rel_err(out, ref)

        def call():
            ta.paged_attention_prefill(q, kv, table, lens, starts, out=out,
                                       max_query_len=num_new, **kw)
        us = timer(call)
        g_us = timer(_graph(call))
        ref_us = None if args.no_reference_timing else \
            timer(lambda: ta.paged_attention_prefill_ref(q, kv, table, lens, starts, **kw))
        pairs = sum(ctx + i + 1 for i in range(num_new))  # causal (query, key) pairs
        tflops = 4 * NUM_HEADS * HEAD_DIM * pairs / g_us / 1e6
        rows.append(_row(f"prefill ctx={ctx} new={num_new}", err, us, g_us, ref_us, tflops,
                         "TFLOP/s"))
    return rows


def _mla_case(heads: int, batch: int, ctx: int, gen: torch.Generator):
    """(q, cache, block table, seq_lens) of one MLA decode case: every sequence ``ctx``
    latents in shuffled blocks, bf16."""
    need = -(-ctx // BLOCK_SIZE)
    perm = torch.randperm(batch * need + 16, generator=gen, device=DEVICE)
    table = perm[:batch * need].view(batch, need).to(torch.int32)
    dim = MLA_RANK + MLA_ROPE
    cache = torch.randn(1, perm.numel() * BLOCK_SIZE, 1, dim, generator=gen, device=DEVICE,
                        dtype=DTYPE)
    q = torch.randn(batch, heads, dim, generator=gen, device=DEVICE, dtype=DTYPE)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    return q, cache, table, lens


def bench_mla(_ta, timer, args, gen) -> list[str]:
    from pagedllm.attention import triton_mla as tm
    from pagedllm.attention.mla import mla_decode_attention_ref
    rows = []
    kw = dict(scale=(192 ** -0.5), block_size=BLOCK_SIZE, kv_lora_rank=MLA_RANK)
    for heads in MLA_HEADS:
        for batch in MLA_BATCHES:
            for ctx in MLA_CONTEXTS:
                q, cache, table, lens = _mla_case(heads, batch, ctx, gen)
                ref = mla_decode_attention_ref(q.float(), cache.float(), table, lens, **kw)
                ref_us = None if args.no_reference_timing else \
                    timer(lambda: mla_decode_attention_ref(q, cache, table, lens, **kw))
                nbytes = batch * ctx * (MLA_RANK + MLA_ROPE) * cache.element_size()
                flops = 2 * batch * ctx * heads * (2 * MLA_RANK + MLA_ROPE)
                for splits in [None] + list(args.sweep_splits or []):
                    def call(splits=splits):
                        return tm.mla_decode_attention(q, cache, table, lens,
                                                       num_splits=splits, **kw)
                    err = _rel_err(call(), ref)
                    us = timer(call)
                    g_us = timer(_graph(call))
                    auto = tm.mla_num_splits(batch, heads, table.shape[1], BLOCK_SIZE,
                                             MLA_RANK, DTYPE, q.device)
                    name = f"mla h={heads} b={batch} ctx={ctx}" + \
                        (f" s={splits}" if splits else "")
                    extra = (f"{flops / g_us / 1e6:.0f} TFLOP/s"
                             + ("" if splits else f" splits={auto}"))
                    rows.append(_row(name, err, us, g_us, ref_us, nbytes / g_us / 1e3,
                                     "GB/s", extra))
                q = cache = ref = None  # free the big cache before the next shape
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    args = _parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU (the kernels' CPU tests are "
                 "tests/kernels/test_triton_attention.py under TRITON_INTERPRET=1)")
    import triton

    from pagedllm.attention import triton_attention as ta
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    timer = Timer(args.iters, args.warmup)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; copy bandwidth {_copy_bandwidth(timer):.0f} GB/s")
    header = (f"{'case':<30} {'triton_us':>9} {'graph_us':>9} {'torch_us':>9} {'speedup':>7} "
              f"{'rate':>9} {'unit':<7} {'rel_err':>8} {'ok':<4}")
    rows = []
    for kind, fn in (("write", bench_write), ("decode", bench_decode),
                     ("prefill", bench_prefill), ("mla", bench_mla)):
        if args.only in (None, kind):
            rows += fn(ta, timer, args, gen)
    print(header)
    print("\n".join(rows))
    if any(" FAIL " in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
