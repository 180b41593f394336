"""Triton kernels of the fp8 (e4m3) linear path: dynamic activation quantization in one
launch (before ``torch._scaled_mm``), and the batch-1 GEMV (``fp8_gemv``, below).

``fp8.activation_scale`` + ``fp8.quantize_fp8`` in torch are about eight small kernels
(abs, max, divide, clamp, cast, divide, clamp, cast) per linear layer and step: in a batch-1
decode step of an 8B model that is ~1,000 launches, more time than the fp8 matmuls save.
Here x is read twice (max |x|, then x / scale rounded to e4m3, saturating at 448):
- per token: one launch, a program per row, scale [M, 1];
- per tensor: two launches over up to ``PEAK_PROGRAMS`` programs of whole rows: each
  program's max |x|, then every program reduces those maxima and quantizes its rows, scale
  [1]. (One program for the whole tensor, as before, took longer than the fp8 matmul it fed
  from about 16 rows: batch-16 decode ran at 0.66x bf16 and 1000 x 256/256 at 0.88x on the
  H100.)
Divisions are IEEE (``tl.div_rn``; Triton's ``/`` on fp32 is ``div.full``, approximate), so
scales and e4m3 codes are torch's bit for bit.

At one row ``torch._scaled_mm`` is far from the bandwidth limit and needs the launch above
first; ``fp8_gemv`` reads the weight once in 16-byte vectors, rounds x to e4m3 itself (the
dynamic scale reduced by every program: no extra launch) and fuses bias and the SiLU gate.
The torch functions stay the references (tests/kernels/test_fp8_scaled_mm.py,
tests/kernels/test_fp8_gemv.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers import pdl

FP8_MAX = 448.0
PEAK_PROGRAMS = 256  # per tensor: programs reducing max |x| (and then quantizing), at most


@triton.jit
def _row_peak(x_ptr, first, last, cols, stride_x, BLOCK: tl.constexpr):
    """max |x| over rows [first, last) in fp32."""
    offs = tl.arange(0, BLOCK)
    peak = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(first, last):
        for c in range(0, cols, BLOCK):
            ok = c + offs < cols
            x = tl.load(x_ptr + r * stride_x + c + offs, mask=ok, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.abs(x))
    return tl.max(peak, axis=0)


@triton.jit
def _peak_kernel(x_ptr, peak_ptr, rows, cols, stride_x, rows_per_program,
                 BLOCK: tl.constexpr):
    # per tensor, first launch: each program's max |x| over its rows
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    tl.store(peak_ptr + tl.program_id(0), _row_peak(x_ptr, first, last, cols, stride_x, BLOCK))


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, peak_ptr, rows, cols, stride_x, stride_q,
                      rows_per_program, num_peaks, PER_TENSOR: tl.constexpr,
                      PEAKS: tl.constexpr, BLOCK: tl.constexpr):
    # this program's rows / scale: per tensor, the max of the first launch's peaks (every
    # program reduces them; program 0 stores the scale); per token, its own row's
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    if PER_TENSOR:
        peaks = tl.load(peak_ptr + tl.arange(0, PEAKS), mask=tl.arange(0, PEAKS) < num_peaks,
                        other=0.0)
        peak = tl.max(peaks, axis=0)
    else:
        peak = _row_peak(x_ptr, first, last, cols, stride_x, BLOCK)
    scale = tl.maximum(tl.div_rn(peak, 448.0), 1e-12)  # IEEE, as torch
    if PER_TENSOR:
        if tl.program_id(0) == 0:
            tl.store(scale_ptr, scale)
    else:
        tl.store(scale_ptr + tl.program_id(0), scale)
    offs = tl.arange(0, BLOCK)
    for r in range(first, last):
        for c in range(0, cols, BLOCK):
            ok = c + offs < cols
            x = tl.load(x_ptr + r * stride_x + c + offs, mask=ok, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
            tl.store(q_ptr + r * stride_q + c + offs, q.to(q_ptr.dtype.element_ty), mask=ok)


def quantize_fp8_dynamic(x: torch.Tensor, per_token: bool,
                         fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """(x as e4m3 [M, K], fp32 scale [M, 1] per token or [1] per tensor) for a 2-D CUDA x,
    or None where this kernel does not serve (the caller runs the torch code)."""
    rows, cols = x.shape
    if x.stride(-1) != 1 or rows == 0:
        return None
    q = torch.empty(rows, cols, dtype=fp8_dtype, device=x.device)
    block = min(triton.next_power_of_2(cols), 2048)
    warps = 4 if block >= 1024 else 2
    if per_token:
        programs, per_program = rows, 1
        peaks = scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    else:  # up to PEAK_PROGRAMS programs reduce max |x|, then as many quantize
        per_program = triton.cdiv(rows, PEAK_PROGRAMS)
        programs = triton.cdiv(rows, per_program)
        peaks = torch.empty(programs, dtype=torch.float32, device=x.device)
        scale = torch.empty(1, dtype=torch.float32, device=x.device)
        _peak_kernel[(programs,)](x, peaks, rows, cols, x.stride(0), per_program, BLOCK=block,
                                  num_warps=warps)
    _quant_fp8_kernel[(programs,)](x, q, scale, peaks, rows, cols, x.stride(0), q.stride(0),
                                   per_program, programs, PER_TENSOR=not per_token,
                                   PEAKS=PEAK_PROGRAMS, BLOCK=block, num_warps=warps)
    return q, scale.view(-1, 1) if per_token else scale


# ---------------------------------------------------------------------------------------------
# Batch-1 GEMV on fp8 weights (``Fp8LinearMethod.apply`` at one row)

ACT_MODES = {"none": 0, "static": 1, "dynamic": 2, "token": 2}  # "token" = "dynamic" at 1 row


@triton.jit
def _row_scale_dynamic(x_ptr, K, BLOCK: tl.constexpr):
    # max|x| / 448 over the row, clamped at 1e-12, in fp32 with IEEE division: bit for bit
    # ``fp8.activation_scale`` (and ``_quant_fp8_kernel``)
    offs = tl.arange(0, BLOCK)
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(x_ptr + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
    return tl.maximum(tl.div_rn(tl.max(peak, 0), 448.0), 1e-12)


@triton.jit
def _quantize_e4m3(x, scale, inv, GUARD: tl.constexpr):
    # ``fp8.quantize_fp8`` bit for bit: x / scale correctly rounded in fp32 (IEEE, as torch
    # divides), clamped to +-448, rounded to e4m3 (nearest even). The quotient: q0 = x * inv
    # (inv = 1 / scale correctly rounded), then one exact-remainder correction
    # q0 + fma(-q0, scale, x) * inv, which is div.rn's own fast path without its per-element
    # reciprocal (MUFU), range check and slow-path call (12+ instructions an element, 3
    # here); checked equal to IEEE division on every positive bf16 x for 4,000 scales
    # (1e-12 .. 1e3). GUARD (a static scale, where x / scale may overflow): q0 is clamped to
    # +-896 first so that inf - inf arises nowhere and such quotients saturate at +-448 as
    # torch's do (a dynamic scale keeps |x / scale| <= 448)
    q = x * inv
    if GUARD:
        q = tl.minimum(tl.maximum(q, -896.0), 896.0)
    q = tl.fma(tl.fma(-q, scale, x), inv, q)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    return q.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def _accumulate(acc, acc_up, x, w, u, x_scale, x_inv, ACT: tl.constexpr, GATED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    # one chunk: x (fp32) rounded to e4m3 unless ACT 0, times the chunk's weights, each
    # 16-value vector summed in registers
    if ACT != 0:
        x = _quantize_e4m3(x, x_scale, x_inv, ACT == 1)
    acc += tl.sum(tl.reshape(w.to(tl.float32) * x, [BLOCK_N, BLOCK_K // VEC, VEC]), 2)
    if GATED:
        acc_up += tl.sum(tl.reshape(u.to(tl.float32) * x, [BLOCK_N, BLOCK_K // VEC, VEC]), 2)
    return acc, acc_up


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, rs_ptr, xs_ptr, b_ptr, out_ptr, N, K, stride_wn, up_offset,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     VEC: tl.constexpr, PEAK_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # One row of x times BLOCK_N rows of W (and, GATED, the BLOCK_N up rows up_offset
    # further). The [BLOCK_N, BLOCK_K] weight tile is contiguous along K, so each thread
    # loads one 16-byte vector (VEC e4m3 values) of every row: the BLOCK_N rows sit in its
    # registers and each x element it rounds to e4m3 (static scale: loaded; dynamic:
    # max|x| / 448 of the row, each program reducing x first in PEAK_BLOCK chunks, x sits
    # in L2) serves BLOCK_N rows. Products of two e4m3 values are exact in fp32; each
    # vector's 16 products are summed in registers every chunk (the [BLOCK_N, BLOCK_K //
    # VEC] fp32 accumulator). ACT 0 (W8A16): x as it is. The first chunk's weights are
    # loaded before waiting for x (PDL: the kernel before writes it), the rest in the loop.
    # bf16 x loads 8 values a thread, the weights 16: one of the two goes through shared
    # memory every chunk, and it must be x (a weight tile carried across iterations as a
    # prefetch, or loaded after x within the loop, made the compiler move the weights;
    # ``benchmarks/triton_aot_check.py --only fp8`` flags that).
    # Epilogue: x_scale * row_scale, rounded like ``scaled_mm_fp8`` + ``gptq.epilogue``: to
    # x's dtype, + bias (rounded), then silu(gate) * up
    pdl.launch_dependents(USE_PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)[None, :]
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (cols < K)
    w = tl.load(w_rows + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    u = w
    if GATED:
        u = tl.load(w_rows + up_offset + cols, mask=mask, other=0.0,
                    eviction_policy="evict_first")
    scale = tl.load(rs_ptr + rows, mask=row_ok, other=0.0)  # weights: written at load
    x_scale = 1.0
    if ACT == 1:
        x_scale = tl.load(xs_ptr)  # the checkpoint's input_scale: written at load
    pdl.wait(USE_PDL)
    if ACT == 2:
        x_scale = _row_scale_dynamic(x_ptr, K, PEAK_BLOCK)
    x_inv = tl.div_rn(1.0, x_scale)  # correctly rounded: see _quantize_e4m3
    acc = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    acc, acc_up = _accumulate(acc, acc_up, x, w, u, x_scale, x_inv, ACT, GATED, BLOCK_N,
                              BLOCK_K, VEC)
    for k in range(BLOCK_K, K, BLOCK_K):
        kk = k + cols
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        mask = row_ok[:, None] if EVEN_K else row_ok[:, None] & (kk < K)
        w = tl.load(w_rows + kk, mask=mask, other=0.0, eviction_policy="evict_first")
        if GATED:
            u = tl.load(w_rows + up_offset + kk, mask=mask, other=0.0,
                        eviction_policy="evict_first")
        acc, acc_up = _accumulate(acc, acc_up, x, w, u, x_scale, x_inv, ACT, GATED, BLOCK_N,
                                  BLOCK_K, VEC)
    dtype = x_ptr.dtype.element_ty
    out = (tl.sum(acc, 1) * (x_scale * scale)).to(dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + bias).to(dtype)
    if GATED:
        up_scale = tl.load(rs_ptr + N + rows, mask=row_ok, other=0.0)
        up = (tl.sum(acc_up, 1) * (x_scale * up_scale)).to(dtype)
        if HAS_BIAS:
            up_bias = tl.load(b_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
            up = (up.to(tl.float32) + up_bias).to(dtype)
        g = out.to(tl.float32)
        out = (g / (1.0 + tl.exp(-g)) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows, out, mask=row_ok)


# (block_n, block_k, num_warps) by the weight's [N, K] (Llama-3-8B's projections; starting
# points from the sm_90 register report of ``benchmarks/triton_aot_check.py --only fp8``, to be
# replaced by the GPU sweep of ``benchmarks/quant_bench.py --only kernels --tune-fp8``).
# BLOCK_N rows a thread amortize its rounding of x (a division an element); a gated
# program reads 2 * BLOCK_N rows
FP8_GEMV_CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (6144, 4096): (8, 2048, 4), (4096, 4096): (8, 2048, 4), (28672, 4096): (4, 2048, 4),
    (4096, 14336): (8, 2048, 4)}
FP8_GEMV_DEFAULT = (8, 2048, 4)


def _check_gemv_args(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor,
                     x_scale: torch.Tensor | None, activations: str, gated: bool) -> None:
    """ValueError for inputs ``fp8_gemv`` does not take (never a silent fallback)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1] or \
            weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"fp8_gemv takes x [1, K] and a row-major weight [N, K], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)} strides "
                         f"{weight.stride()}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemv takes bf16/fp16 x and float8_e4m3fn weights, got "
                         f"{x.dtype} and {weight.dtype}")
    if activations not in ACT_MODES:
        raise ValueError(f"activations {activations!r}: choose from {', '.join(ACT_MODES)}")
    if (x_scale is not None) != (activations == "static"):
        raise ValueError("x_scale is the static activation scale: given exactly when "
                         f"activations is 'static' (got {activations!r})")
    if x_scale is not None and (x_scale.numel() != 1 or x_scale.dtype != torch.float32):
        raise ValueError(f"x_scale must be one fp32 value, got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")
    if row_scale.shape != (weight.shape[0],) or row_scale.dtype != torch.float32:
        raise ValueError(f"row_scale must be fp32 [{weight.shape[0]}], got "
                         f"{row_scale.dtype} {tuple(row_scale.shape)}")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight has 2d rows, got {weight.shape[0]}")


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor,
             x_scale: torch.Tensor | None, activations: str,
             bias: torch.Tensor | None = None, gated: bool = False,
             config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] @ (weight [N, K] e4m3 * row_scale[:, None])^T (+ bias) -> [1, N] in x's
    dtype, for batch-1 decode, where ``torch._scaled_mm`` at one row is far from the
    bandwidth limit and needs a second launch to quantize x. ``activations``: "static"
    (``x_scale``, a one-element fp32 tensor), "dynamic" / "token" (max|x| / 448 of the row,
    computed inside the kernel: no extra launch) or "none" (W8A16: x not quantized).
    ``gated``: weight is a fused [gate; up] of 2d rows, result silu(gate) * up [1, d].
    ``scaled_mm_fp8`` + ``gptq.epilogue``'s quantization and rounding with fp32 sums: the
    float64 result rounded, within one ulp (cuBLASLt's fp8 accumulation is coarser: on the
    H100 up to 1.4% of its outputs were further from the GEMV's).
    ``config``: (block_n, block_k, num_warps), per shape in ``FP8_GEMV_CONFIGS``.
    No host syncs and fixed shapes: CUDA graphs capture it."""
    _check_gemv_args(x, weight, row_scale, x_scale, activations, gated)
    n_rows, k = weight.shape
    n = n_rows // 2 if gated else n_rows
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or FP8_GEMV_CONFIGS.get((n_rows, k), FP8_GEMV_DEFAULT)
    block_k = min(block_k, triton.next_power_of_2(k))
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, row_scale, x_scale if x_scale is not None else row_scale,
        bias if bias is not None else x, out, n, k, weight.stride(0), n * weight.stride(0),
        ACT=ACT_MODES[activations], HAS_BIAS=bias is not None, GATED=gated,
        EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, VEC=min(16, block_k),
        PEAK_BLOCK=min(triton.next_power_of_2(k), 2 * block_k), num_warps=warps,
        **pdl.options(x))
    return out
