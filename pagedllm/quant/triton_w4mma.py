"""4-bit weight-only matmuls on the tensor cores: W4A16 layers whose groups are whole
64-input tiles (GPTQ without act-order, AWQ after ``repack_awq``, compressed-tensors
pack-quantized), the weight repacked once at load (unless ``PAGEDLLM_W4_MMA=0``) into the
register layout of
``mma.sync.m16n8k16``. ``w4_matmul`` routes by rows: up to ``MMA_MAX_ROWS`` the
register-fragment kernel below, up to ``DEQUANT_MIN_ROWS`` a wgmma GEMM that decodes the same
words (``_gemm_kernel``), more: dequantize once, then cuBLAS.

Why: the CUDA-core GEMV of ``triton_wna16`` spends ~5.5 instructions a weight (decode the
value, convert, multiply-add, plus its share of the x, zero and scale work), so on the H100
it reads int4 at half the rate a load-only kernel reaches. Here a weight costs about one
and a half: eight 4-bit values of a word become four bf16 pairs with one LOP3 each (the
value ORed into the mantissa of 128.0, so the pair reads 128 + q), one packed subtract
takes away 128 + the zero point exactly, and one ``mma.sync`` multiplies a 16 x 16 tile by
up to eight tokens; the group's scale multiplies the fp32 result once per group.

Layout (``repack``): words [N/16, K/64, 32, 4] int32. A warp computes 16 output features
(one ``nb``); lane ``l`` (g = l // 4, c = l % 4) holds, per 64 inputs (``kq``), four words,
one per ``mma`` k-step j; the word's value i sits at bits 4i and is W[k, n] for
n = 16 nb + g + 8 (i & 1), k = 64 kq + 16 c + 4 j + 2 ((i >> 1) & 1) + (i >> 2).
Decoded as (word >> 4m) & 0x000f000f for m = 0..3, the pairs are exactly the A fragment
registers a0..a3 of the k-step (rows g / g + 8, k pairs); the k order inside a k-step is
permuted, and x is read in the same order: lane c's B fragments for the four k-steps are 16
consecutive inputs, two 16-byte loads a token. The accumulators D[g (+8), 2c (+1)] are
(feature, token) pairs. Tokens come in tiles of eight (the mma's n); up to ``MAX_TILES``
tiles share each decoded A fragment.

The asm needs sm_80+ (``sub.rn.bf16x2``: sm_90). The Triton interpreter cannot run it: there
the kernel runs ``_mma_step_emulated`` (the same fragment arithmetic in plain Triton), and
``emulate`` checks the fragment bookkeeping in torch; ``unpack`` / ``dequantize`` read the
layout back. tests/kernels/test_w4mma.py holds the oracles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.triton_attention import _last_arrival, _split_counters
from pagedllm.layers import pdl
from pagedllm.quant.packing import pack_int32, unpack_int32
from pagedllm.quant.triton_wna16 import _epilogue, _reduce, _sm_count
from pagedllm.switches import switches

# token tiles of 8 that one kernel instance multiplies per decoded weight tile (``matmul``
# takes up to 8 * MAX_TILES rows), and the rows up to which layers take it: H100, Llama-3-8B
# projections (s8a), its 1-row kernels were 1.1-1.3x faster than triton_wna16's GEMV, its
# 16- and 64-row ones slower than the wgmma GEMM (every warp reloads x), so more rows take
# ``_gemm_kernel`` (that GEMM reading this layout) and from DEQUANT_MIN_ROWS dequantize + cuBLAS
MAX_TILES = 8
MAX_ROWS = 8 * MAX_TILES
MMA_MAX_ROWS = 8
DEQUANT_MIN_ROWS = 512
# (warps of 16 features a program, programs per SM that split-K aims for, least inputs a
# split, mma dependency chains at one token tile): the register-fragment kernel's defaults,
# the H100 sweep of the ninth part (``quant_bench.py --tune-w4mma``: two chains and splits of
# 256 inputs were in every shape's best three; o_proj 9.41 -> 7.33 us); a split covers at least
# max(least inputs, SPLIT_K_PER_ROW * rows): its fp32 partial sums (written, then read by the
# fold) stay small next to the weight it reads
CONFIG = (4, 8, 256, 2)
SPLIT_MIN_K = CONFIG[2]  # the default least split on its own: tests shrink it
SPLIT_K_PER_ROW = 32


def eligible(bits: int, act_order: bool, k: int, n: int, group_size: int) -> bool:
    """Whether a W4A16 layer can take this layout: 4-bit, groups of whole 64-input tiles that
    divide K (or one group), N a multiple of 16 and K of 64. (A last, shorter group, as in
    DeepSeek-V2-Lite's down_proj, K = 10944 = 85.5 groups of 128, stays on triton_wna16:
    the kernels here loop whole groups without a K mask.)"""
    return (bits == 4 and not act_order and n % 16 == 0 and k % 64 == 0
            and (group_size <= 0 or group_size >= k
                 or (group_size % 64 == 0 and k % group_size == 0)))


def _order(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] -> [N/16, K/64, 32, 4, 8] in the layout's (nb, kq, lane, j, i) order."""
    k, n = codes.shape
    view = codes.view(k // 64, 4, 4, 2, 2, n // 16, 2, 8)  # kq c j h2 b0 nb r8 g
    # lane = 4 g + c, i = 4 b0 + 2 h2 + r8
    return view.permute(5, 0, 7, 1, 2, 4, 3, 6).reshape(n // 16, k // 64, 32, 4, 8)


def _unorder(values: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """``_order``'s inverse: [N/16, K/64, 32, 4, 8] -> [K, N]."""
    view = values.reshape(n // 16, k // 64, 8, 4, 4, 2, 2, 2)  # nb kq g c j b0 h2 r8
    return view.permute(1, 3, 4, 6, 5, 0, 7, 2).reshape(k, n)


def repack(qweight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """GPTQ 4-bit qweight [K/8, N] -> the layout's words [N/16, K/64, 32, 4] int32, ``chunk``
    columns at a time (``pack_int32``'s int64 temporaries stay those of one chunk)."""
    parts = []
    for n0 in range(0, qweight.shape[1], chunk):
        ordered = _order(unpack_int32(qweight[:, n0:n0 + chunk], 4, 0))
        parts.append(pack_int32(ordered.flatten(3), 4, 3))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The layout's words -> codes [K, N] int32."""
    nb, kq = words.shape[:2]
    return _unorder(unpack_int32(words, 4, 3), kq * 64, nb * 16)


def zero_codes(qzeros: torch.Tensor | None, groups: int, n: int, zero_offset: int,
               device) -> torch.Tensor:
    """Zero points [G, N] int32: GPTQ's packed-along-N qzeros plus ``zero_offset``, or the
    constant ``zero_offset``."""
    if qzeros is None:
        return torch.full((groups, n), zero_offset, dtype=torch.int32, device=device)
    return unpack_int32(qzeros, 4, 1)[:, :n] + zero_offset


def dequantize_reference(words: torch.Tensor, qzeros: torch.Tensor | None,
                         scales: torch.Tensor, group_size: int,
                         zero_offset: int) -> torch.Tensor:
    """W [K, N] float32 from the layout (torch)."""
    codes = unpack(words)
    k, n = codes.shape
    group = torch.arange(k, device=codes.device) // (k if group_size <= 0 else min(group_size, k))
    z = zero_codes(qzeros, scales.shape[0], n, zero_offset, codes.device)
    return (codes - z[group]).float() * scales.float()[group]


def emulate(x: torch.Tensor, words: torch.Tensor, qzeros: torch.Tensor | None,
            scales: torch.Tensor, group_size: int, zero_offset: int) -> torch.Tensor:
    """x [M, K] @ W as the kernel computes it, in torch: per lane the A fragments decoded
    from its words (128 + q minus 128 + z), the B fragments from x in the layout's k order,
    the m16n8k16 products, then each group's scale. Checks the fragment bookkeeping on
    CPU (the asm cannot run there)."""
    m, k = x.shape
    nbs, kqs = words.shape[:2]
    n = nbs * 16
    lane = torch.arange(32)
    g, c = lane // 4, lane % 4
    z = zero_codes(qzeros, scales.shape[0], n, zero_offset, words.device).float()
    s = scales.float()
    out = torch.zeros(m, n, dtype=torch.float64)
    xf = x.double()
    group_of = k if group_size <= 0 else min(group_size, k)
    for nb in range(nbs):
        for kq in range(kqs):
            grp = (kq * 64) // group_of
            d = torch.zeros(16, m, dtype=torch.float64)  # D[feature row, token]
            for j in range(4):
                # A [16, 16] in mma k order, B [16, M]
                a = torch.zeros(16, 16, dtype=torch.float64)
                b = torch.zeros(16, m, dtype=torch.float64)
                w = words[nb, kq, :, j].to(torch.int64) & 0xFFFFFFFF
                for reg in range(4):  # a0..a3: rows g / g+8, k pair 2c / 2c+8
                    row = g + 8 * (reg & 1)
                    col = 2 * c + 8 * (reg >> 1)
                    lo = ((w >> (4 * reg)) & 15).double()
                    hi = ((w >> (4 * reg + 16)) & 15).double()
                    zr = z[grp, nb * 16 + row].double()
                    a[row, col] = (128 + lo) - (128 + zr)
                    a[row, col + 1] = (128 + hi) - (128 + zr)
                base = kq * 64 + 16 * c + 4 * j  # lane c's inputs of this k-step
                for e in range(2):  # b0: mma k 2c + e <- input base + e; b1: 2c + 8 + e <- + 2
                    b[2 * c + e] = xf[:, base + e].t()
                    b[2 * c + 8 + e] = xf[:, base + 2 + e].t()
                d += a @ b
            rows = nb * 16 + torch.arange(16)
            out[:, rows] += (d * s[grp, rows].double()[:, None]).t()
    return out


def _asm_text(tiles: int, fp16: bool, chains: int = 1) -> str:
    """The inline PTX of one lane's four k-steps for ``tiles`` token tiles (module docstring).
    Every operand is a [tiles, lanes, 4] tensor packed 4 * tiles to an instance, so the
    operands are: $0.. the output accumulators (tile t, register i: 4 t + i), then the words
    (broadcast: the first four used), each tile's x pairs 0-3 (xa) and 4-7 (xb), the zero
    pairs of rows g and g + 8 (broadcast: the first used), the input accumulators.
    ``chains`` 2: the odd k-steps accumulate into a second set of registers, added at the
    end, so two mma dependency chains interleave (the default since the H100 sweep)."""
    n = 4 * tiles
    w0, xa, xb, zl, zh, acc = n, 2 * n, 3 * n, 4 * n, 5 * n, 6 * n
    magic = "0x64006400" if fp16 else "0x43004300"
    kind = "f16" if fp16 else "bf16"
    lines = ["{", ".reg .b32 a0, a1, a2, a3, t;",
             ".reg .f32 " + ", ".join(f"d{i}" for i in range(n)) + ";"]
    lines += [f"mov.f32 d{i}, ${acc + i};" for i in range(n)]
    if chains == 2:
        lines.append(".reg .f32 " + ", ".join(f"e{i}" for i in range(n)) + ";")
        lines += [f"mov.f32 e{i}, 0f00000000;" for i in range(n)]
    for j in range(4):
        word = f"${w0 + j}"
        lines.append(f"lop3.b32 a0, {word}, 0x000f000f, {magic}, 0xea;")
        for m in (1, 2, 3):
            lines.append(f"shr.u32 t, {word}, {4 * m};")
            lines.append(f"lop3.b32 a{m}, t, 0x000f000f, {magic}, 0xea;")
        for m in range(4):  # a0, a2: row g; a1, a3: row g + 8
            lines.append(f"sub.rn.{kind}x2 a{m}, a{m}, ${zl if m % 2 == 0 else zh};")
        for t in range(tiles):
            # k-step j's B fragment: the lane's pairs 2j and 2j + 1 (xa: 0-3, xb: 4-7)
            src = (xa if j < 2 else xb) + 4 * t + 2 * (j % 2)
            reg = "e" if chains == 2 and j % 2 else "d"
            d = ", ".join(f"{reg}{4 * t + i}" for i in range(4))
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{{d}}}, "
                         f"{{a0, a1, a2, a3}}, {{${src}, ${src + 1}}}, {{{d}}};")
    if chains == 2:
        lines += [f"add.f32 ${i}, d{i}, e{i};" for i in range(n)]
    else:
        lines += [f"mov.f32 ${i}, d{i};" for i in range(n)]
    lines.append("}")
    return "\n".join(lines)


def _constraints(tiles: int) -> str:
    n = 4 * tiles
    return ",".join(["=f"] * n + ["r"] * (5 * n) + ["f"] * n)


# the asm texts as Triton constants (a jit function picks one by its constexpr arguments)
_A1, _A2, _A4, _A8 = (tl.constexpr(_asm_text(t, False)) for t in (1, 2, 4, 8))
_H1, _H2, _H4, _H8 = (tl.constexpr(_asm_text(t, True)) for t in (1, 2, 4, 8))
_C1, _C2, _C4, _C8 = (tl.constexpr(_constraints(t)) for t in (1, 2, 4, 8))
_A1X2, _H1X2 = tl.constexpr(_asm_text(1, False, 2)), tl.constexpr(_asm_text(1, True, 2))


@triton.jit
def _halves(pairs, FP16: tl.constexpr):
    """int32 pairs of 16-bit floats -> (low, high) as fp32."""
    if FP16:
        lo = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((pairs >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = hi.to(tl.float32)
    else:
        lo = (pairs << 16).to(tl.float32, bitcast=True)
        hi = (pairs & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _pick(v, J: tl.constexpr):
    """v[..., J] of a [..., 4] tensor."""
    return tl.sum(tl.where(tl.arange(0, 4) == J, v, 0), axis=len(v.shape) - 1)


@triton.jit
def _a_values(word, m: tl.constexpr, z):
    """Register m of lane (g, c)'s A fragment, decoded: (low, high) values q - z -> [.., 2]."""
    lo = ((word >> (4 * m)) & 15) - z
    hi = ((word >> (4 * m + 16)) & 15) - z
    return tl.join(lo, hi).to(tl.float32)


@triton.jit
def _mma_step_emulated(w, xa, xb, zl, zh, acc, TILES: tl.constexpr, FP16: tl.constexpr):
    """``_mma_step`` in plain Triton operations, for the interpreter (CPU tests): each warp's
    fragments gathered into dense 16 x 16 A and 16 x 8 B tiles by reshapes, the products
    summed in fp32. Same layout bookkeeping as the asm; exact where the asm is (products of
    bf16 values, fp32 sums)."""
    R: tl.constexpr = w.shape[1]
    W: tl.constexpr = R // 32
    TW: tl.constexpr = TILES * W
    if FP16:
        bits = 0x6400
    else:
        bits = 0x4300
    zlo = tl.reshape((_pick(zl, 0) & 0xFFFF) - bits, (TW, 8, 4))  # zero point of row g
    zhi = tl.reshape((_pick(zh, 0) & 0xFFFF) - bits, (TW, 8, 4))  # of row g + 8
    d = tl.zeros((TW, 16, 8), dtype=tl.float32)
    for j in tl.static_range(4):
        word = tl.reshape(_pick(w, j), (TW, 8, 4))  # lane (g, c)'s word of k-step j
        if j < 2:
            src = xa
        else:
            src = xb
        b0lo, b0hi = _halves(tl.reshape(_pick(src, 2 * (j % 2)), (TW, 8, 4)), FP16)
        b1lo, b1hi = _halves(tl.reshape(_pick(src, 2 * (j % 2) + 1), (TW, 8, 4)), FP16)
        # A[row = (m & 1, g), k = (m >> 1, c, h)] from lane (g, c), register m, half h
        a_lo = tl.join(_a_values(word, 0, zlo), _a_values(word, 2, zlo))  # [TW, g, c, h, mhi]
        a_hi = tl.join(_a_values(word, 1, zhi), _a_values(word, 3, zhi))
        a = tl.join(a_lo, a_hi)  # [TW, g, c, h, mhi, mlo]
        a = tl.reshape(tl.permute(a, (0, 5, 1, 4, 2, 3)), (TW, 16, 16))
        # B[k = (bsel, c, h), token g] from lane (g, c), register bsel, half h
        bb = tl.join(tl.join(b0lo, b0hi), tl.join(b1lo, b1hi))  # [TW, g, c, h, bsel]
        bb = tl.reshape(tl.permute(bb, (0, 4, 2, 3, 1)), (TW, 16, 8))
        d += tl.sum(a[:, :, :, None] * bb[:, None, :, :], axis=2)
    # D[row = (ihi, g), token = (c, ilo)] -> lane (g, c), register i = 2 ihi + ilo
    d = tl.reshape(d, (TW, 2, 8, 4, 2))
    d = tl.reshape(tl.permute(d, (0, 2, 3, 1, 4)), (TILES, R, 4))
    return acc + d


@triton.jit
def _mma_step(w, xa, xb, zl, zh, acc, TILES: tl.constexpr, FP16: tl.constexpr,
              CHAINS: tl.constexpr):
    """The four k-steps of one lane's words for TILES token tiles: every operand a
    [TILES, lanes, 4] tensor whose 4 * TILES values of a lane one thread holds; returns the
    new accumulators."""
    if TILES == 1 and CHAINS == 2:
        asm: tl.constexpr = _H1X2 if FP16 else _A1X2
        cons: tl.constexpr = _C1
    elif TILES == 1:
        asm: tl.constexpr = _H1 if FP16 else _A1
        cons: tl.constexpr = _C1
    elif TILES == 2:
        asm: tl.constexpr = _H2 if FP16 else _A2
        cons: tl.constexpr = _C2
    elif TILES == 4:
        asm: tl.constexpr = _H4 if FP16 else _A4
        cons: tl.constexpr = _C4
    else:
        asm: tl.constexpr = _H8 if FP16 else _A8
        cons: tl.constexpr = _C8
    return tl.inline_asm_elementwise(asm=asm, constraints=cons, args=[w, xa, xb, zl, zh, acc],
                                     dtype=tl.float32, is_pure=True, pack=4 * TILES)


@triton.jit
def _w4mma_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, part_ptr, count_ptr, bias_ptr, M, N,
                  K, k_split, splits, half, zero_offset, stride_xm, stride_zg, stride_sg,
                  stride_om, stride_ps, stride_pm, GROUP: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, FOLD: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GATED: tl.constexpr, TILES: tl.constexpr, FP16: tl.constexpr,
                  WARPS: tl.constexpr, CHAINS: tl.constexpr, EMULATE: tl.constexpr,
                  USE_PDL: tl.constexpr):
    # program (pid_n, pid_s, pid_t): features [16 WARPS pid_n, + 16 WARPS) (a warp each 16),
    # inputs [k_split pid_s, + k_split), tokens [8 TILES pid_t, + 8 TILES). Element (t, r, i)
    # of the [TILES, 32 WARPS, 4] tensors is register i of lane r % 32 of warp r // 32 for
    # token tile t (B fragment pairs of xa / xb, accumulators D). x is seen as int32 pairs
    # (stride_xm in pairs). FOLD: split sums into ``part`` [splits, M, N] fp32; the last of
    # a column tile's programs (gate and up tiles together when GATED) folds them with the
    # epilogue into ``out``; else the sums go straight to ``part`` (one split: x's dtype).
    pdl.launch_dependents(USE_PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_t = tl.program_id(2)
    R: tl.constexpr = 32 * WARPS
    # [TILES, R, 4] tensors: a lane is a row, the tiles its registers (one thread holds
    # all 4 * TILES values of its row, in the asm's operand order)
    r = tl.arange(0, R)[None, :, None]
    e = tl.arange(0, 4)[None, None, :]
    tile = tl.arange(0, TILES)[:, None, None]
    lane = r % 32
    g = lane // 4
    c = lane % 4
    nb = pid_n * WARPS + r // 32
    kqs = K // 64
    w_ptrs = qw_ptr + (nb * kqs * 32 + lane) * 4 + e  # [1, R, 4]
    # x pointers as [TILES * R, 4] (so its loads take the row-a-lane layout), read as
    # [TILES, R, 4]
    q = tl.arange(0, TILES * R)[:, None]
    q_tok = pid_t * 8 * TILES + (q // R) * 8 + (q % 32) // 4  # the B fragments' token
    x_ok = q_tok < M
    x_ptrs = x_ptr + q_tok.to(tl.int64) * stride_xm + ((q % 32) % 4) * 8 + tl.arange(0, 4)[None, :]
    feat = nb * 16 + g + 8 * (e // 2)  # D's feature
    otok = pid_t * 8 * TILES + tile * 8 + 2 * c + e % 2  # D's token
    lanes = tl.arange(0, R)
    n_lo = (pid_n * WARPS + lanes // 32) * 16 + (lanes % 32) // 4  # row g's feature
    if FP16:
        base = 0x6400  # 1024.0: a 4-bit value in the low mantissa bits reads 1024 + q
    else:
        base = 0x4300  # 128.0 in bf16
    total = tl.zeros((TILES, R, 4), dtype=tl.float32)
    k_start = pid_s * k_split
    w = tl.load(w_ptrs + (k_start // 64) * 128)  # the weights do not wait for the kernel before
    pdl.wait(USE_PDL)
    for k0 in range(k_start, k_start + k_split, GROUP):
        grp = k0 // GROUP
        s_lo = tl.load(s_ptr + grp * stride_sg + n_lo).to(tl.float32)
        s_hi = tl.load(s_ptr + grp * stride_sg + n_lo + 8).to(tl.float32)
        s = tl.where(e < 2, s_lo[None, :, None], s_hi[None, :, None])
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + grp * stride_zg + n_lo // 8)
            z_lo = ((zw >> ((n_lo % 8) * 4)) & 15) + zero_offset
            zw_hi = tl.load(qz_ptr + grp * stride_zg + (n_lo + 8) // 8)
            z_hi = ((zw_hi >> (((n_lo + 8) % 8) * 4)) & 15) + zero_offset
        else:
            z_lo = n_lo * 0 + zero_offset
            z_hi = z_lo
        zl = tl.broadcast_to(((base + z_lo) * 65537)[None, :, None], (TILES, R, 4))
        zh = tl.broadcast_to(((base + z_hi) * 65537)[None, :, None], (TILES, R, 4))
        acc = tl.zeros((TILES, R, 4), dtype=tl.float32)
        for kk in range(0, GROUP // 64):
            kq = k0 // 64 + kk
            xa = tl.reshape(tl.load(x_ptrs + kq * 32, mask=x_ok, other=0), (TILES, R, 4))
            xb = tl.reshape(tl.load(x_ptrs + kq * 32 + 4, mask=x_ok, other=0), (TILES, R, 4))
            wb = tl.broadcast_to(w, (TILES, R, 4))
            if kq + 1 < (k_start + k_split) // 64:  # the next k-steps' words, requested early
                w = tl.load(w_ptrs + (kq + 1) * 128)
            if EMULATE:  # the interpreter: no inline PTX
                acc = _mma_step_emulated(wb, xa, xb, zl, zh, acc, TILES, FP16)
            else:
                acc = _mma_step(wb, xa, xb, zl, zh, acc, TILES, FP16, CHAINS)
        total += acc * s
    ok = otok < M
    if FOLD:
        tl.store(part_ptr + pid_s * stride_ps + otok.to(tl.int64) * stride_pm + feat, total,
                 mask=ok)
        BLOCK: tl.constexpr = 16 * WARPS
        col_tiles = tl.num_programs(0)
        if GATED:
            col_tiles = col_tiles // 2
        tile_id = pid_n % col_tiles
        counter = count_ptr + pid_t * col_tiles + tile_id
        if _last_arrival(counter, splits * (2 if GATED else 1)):
            _fold_rows(part_ptr, bias_ptr, out_ptr, pid_t * 8 * TILES, M, tile_id * BLOCK,
                       splits, half, stride_ps, stride_pm, stride_om, half if GATED else N,
                       HAS_BIAS, GATED, 8 * TILES, BLOCK)
            tl.atomic_xchg(counter, 0)  # ready for the next launch
    else:
        tl.store(part_ptr + pid_s * stride_ps + otok.to(tl.int64) * stride_pm + feat,
                 total.to(part_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, M, N, K, k_split, zero_offset,
                 stride_xm, stride_om, stride_os, stride_zg, stride_sg, GROUP: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # batches of more than 8 rows: out[split, m, n] = x[m, split's K range] @ W[.., n] as
    # W^T x^T with tl.dot (x tiles through shared memory, as triton_wna16's GEMM), the
    # [BLOCK_N, BLOCK_K] tile of W^T decoded from the layout's words: (nb, kq, lane (g, c),
    # j, value i (b0, h2, r8)) is feature 16 nb + 8 r8 + g, input 64 kq + 16 c + 4 j + 2 h2 + b0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    NB: tl.constexpr = BLOCK_N // 16
    KQ: tl.constexpr = BLOCK_K // 64
    kqs = K // 64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_nb = tl.arange(0, NB)[:, None, None, None]
    a_kq = tl.arange(0, KQ)[None, :, None, None]
    a_w = tl.arange(0, 128)[None, None, :, None]  # lane * 4 + j
    shifts = (tl.arange(0, 8) * 4).to(tl.uint32)[None, None, None, :]
    w_base = qw_ptr + ((pid_n * NB + a_nb) * kqs + a_kq) * 128 + a_w
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_s * k_split
    for k0 in range(k_start, k_start + k_split, BLOCK_K):
        words = tl.load(w_base + (k0 // 64) * 128).to(tl.uint32, bitcast=True)
        codes = ((words >> shifts) & 15).to(tl.int32, bitcast=True)  # [NB, KQ, 128, 8]
        codes = tl.reshape(codes, (NB, KQ, 8, 4, 4, 2, 2, 2))  # nb kq g c j b0 h2 r8
        tile = tl.reshape(tl.permute(codes, (0, 7, 2, 1, 3, 4, 6, 5)), (BLOCK_N, BLOCK_K))
        grp = k0 // GROUP
        s = tl.load(s_ptr + grp * stride_sg + offs_n).to(tl.float32)
        if HAS_ZEROS:
            zw = tl.load(qz_ptr + grp * stride_zg + offs_n // 8)
            z = ((zw >> ((offs_n % 8) * 4)) & 15) + zero_offset
        else:
            z = offs_n * 0 + zero_offset
        # q - z, exact in x's dtype: 2**23 + code read as a float (no int-to-float
        # conversion) minus 2**23 + z; the tile's group scale multiplies the fp32 product
        q = (tile | 0x4B000000).to(tl.float32, bitcast=True)
        w_t = (q - (z.to(tl.float32) + 8388608.0)[:, None]).to(x_ptr.dtype.element_ty)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None], other=0.0)
        acc_t += tl.dot(w_t, tl.trans(x)) * s[:, None]
    acc = tl.trans(acc_t)
    tl.store(out_ptr + pid_s * stride_os + offs_m[:, None].to(tl.int64) * stride_om
             + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _fold_rows(part_ptr, bias_ptr, out_ptr, m0, M, n0, splits, half, stride_ps, stride_pm,
               stride_om, n_out, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m0:m0+ROWS, n0:n0+BLOCK] = epilogue(sum over splits of part[s, m, n]) (+ bias;
    GATED: silu(gate) * up, the up columns ``half`` to the right): ``_fold_splits`` for a
    tile of rows, one [ROWS, BLOCK] load a split. The loads bypass L1 (.cg): other programs
    of this launch wrote them."""
    rows = m0 + tl.arange(0, ROWS)
    cols = n0 + tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (cols < n_out)[None, :]
    offs = rows[:, None].to(tl.int64) * stride_pm + cols[None, :]
    acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    acc_up = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=ok, other=0.0, cache_modifier=".cg")
        if GATED:
            acc_up += tl.load(part_ptr + s * stride_ps + half + offs, mask=ok, other=0.0,
                              cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < n_out, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + half + cols, mask=cols < n_out,
                              other=0.0).to(tl.float32)[None, :]
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, zero_offset, stride_zg,
                    stride_sg, stride_o, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    BLOCK: tl.constexpr):
    # W^T [N, K] in out's dtype from BLOCK words of the layout (word index (nb, kq, lane,
    # j) flattened), eight values each
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N * K // 8
    word = tl.load(qw_ptr + idx, mask=ok, other=0)
    kqs = K // 64
    j = idx % 4
    lane = (idx // 4) % 32
    kq = (idx // 128) % kqs
    nb = idx // (128 * kqs)
    i = tl.arange(0, 8)
    code = (word[:, None] >> (4 * i)[None, :]) & 15
    n = (nb * 16 + lane // 4)[:, None] + 8 * (i & 1)[None, :]
    k = (kq * 64 + 16 * (lane % 4) + 4 * j)[:, None] + (2 * ((i >> 1) & 1) + (i >> 2))[None, :]
    grp = k // GROUP
    ok2 = ok[:, None]
    s = tl.load(s_ptr + grp * stride_sg + n, mask=ok2, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zw = tl.load(qz_ptr + grp * stride_zg + n // 8, mask=ok2, other=0)
        z = ((zw >> ((n % 8) * 4)) & 15) + zero_offset
    else:
        z = zero_offset
    w = (code - z).to(tl.float32) * s
    tl.store(out_ptr + n.to(tl.int64) * stride_o + k, w.to(out_ptr.dtype.element_ty),
             mask=ok2)



def _group(k: int, group_size: int) -> tuple[int, bool]:
    """(GROUP constexpr, whether the scales / zeros have one row): one group per column
    reads row 0 at every K tile (stride 0) with 64-input tiles."""
    if group_size <= 0 or group_size >= k:
        return 64, True
    return group_size, False


def _warps(n: int, gated: bool, want: int = 4) -> int:
    width = n // 2 if gated else n
    for warps in (want, 4, 2, 1):
        if width % (16 * warps) == 0:
            return warps
    raise AssertionError("eligible() requires N % 16 == 0")


def _splits(m: int, k: int, group: int, programs: int, target: int, least: int,
            per_row: int | None = None) -> int:
    """Split-K count: about ``target`` programs, whole groups per split and every split the
    same size (the kernels loop a split without a K mask), a split at least max(``least``,
    ``per_row`` (default SPLIT_K_PER_ROW) * m) inputs (the fp32 partial sums stay small next
    to the weight)."""
    k_tiles = k // group
    most = max(1, k // max(least, (per_row or SPLIT_K_PER_ROW) * m))
    splits = max(1, min(k_tiles, triton.cdiv(target, programs), most))
    while k_tiles % splits:
        splits -= 1
    return splits


def matmul(x: torch.Tensor, words: torch.Tensor, qzeros: torch.Tensor | None,
           scales: torch.Tensor, group_size: int, zero_offset: int,
           bias: torch.Tensor | None = None, gated: bool = False,
           tiles: int | None = None, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16, M <= ``MAX_ROWS``) @ W (+ bias, then silu(gate) * up when
    ``gated``) -> [M, N or N/2] in x's dtype; W in the layout (``repack``), zeros GPTQ-packed
    [G, N/8] or None (the constant ``zero_offset``), scales [G, N]. ``tiles`` overrides the
    token tiles per program (tests); ``config`` (warps, programs per SM aimed for, least
    inputs a split, mma chains: 1 or 2 at one tile) overrides ``CONFIG`` (tuning)."""
    m, k = x.shape
    n = words.shape[0] * 16
    if not eligible(4, False, k, n, group_size) or words.shape[1] * 64 != k:
        raise ValueError(f"w4mma.matmul: K {k} (words for {words.shape[1] * 64}), N {n}, "
                         f"group size {group_size}: need K % 64 == 0, N % 16 == 0 and groups "
                         "of whole 64-input tiles")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4mma.matmul: x must be fp16 or bf16, not {x.dtype}")
    if not 0 < m <= MAX_ROWS and tiles is None:
        raise ValueError(f"w4mma.matmul: {m} rows; the kernel takes 1 to {MAX_ROWS}")
    if x.stride(-1) != 1 or x.stride(0) % 2 or x.data_ptr() % 4:
        x = x.clone(memory_format=torch.contiguous_format)  # read as aligned int32 pairs
    if tiles is None:
        tiles = next(t for t in (1, 2, 4, 8) if 8 * t >= m)
    token_programs = triton.cdiv(m, 8 * tiles)
    group, one_row = _group(k, group_size)
    want_warps, waves, split_min_k, chains = config or (*CONFIG[:2], SPLIT_MIN_K, CONFIG[3])
    warps = _warps(n, gated, want_warps)
    col_tiles = n // (16 * warps)
    splits = _splits(m, k, group, col_tiles * token_programs, waves * _sm_count(x.device),
                     split_min_k)
    k_split = k // splits
    fold = switches().decode_fold and (splits > 1 or gated)
    n_out = n // 2 if gated else n
    if fold:
        out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
        part = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
        counts = _split_counters(token_programs * (col_tiles // 2 if gated else col_tiles),
                                 x.device)
    else:
        part = torch.empty(splits, m, n, device=x.device,
                           dtype=x.dtype if splits == 1 else torch.float32)
        out = counts = part
    zeros = qzeros if qzeros is not None else scales
    _w4mma_kernel[(col_tiles, splits, token_programs)](
        x.view(torch.int32), words, zeros, scales, out, part, counts,
        bias if bias is not None else part, m, n, k, k_split, splits, n // 2, zero_offset,
        x.stride(0) // 2, 0 if one_row else zeros.stride(0), 0 if one_row else scales.stride(0),
        out.stride(0), part.stride(0), part.stride(1), GROUP=group,
        HAS_ZEROS=qzeros is not None, FOLD=fold, HAS_BIAS=bias is not None, GATED=gated,
        TILES=tiles, FP16=x.dtype == torch.float16, WARPS=warps,
        CHAINS=chains if tiles == 1 else 1, EMULATE=not x.is_cuda, num_warps=warps,
        **pdl.options(x))
    if fold:
        return out
    if splits > 1:
        return _reduce(part, bias, gated, x.dtype)
    return _epilogue(part[0], bias, gated)


# (least rows, most rows, config): ``_gemm_config``'s rows tuned for this GEMM (other row
# counts: triton_wna16's table, whose 33-64 row this replaces). H100 sweep at 64 rows
# (``quant_bench.py --tune-w4mma --rows 64``, ninth part): 128-input K tiles and splits of
# down to 8 inputs a row; this config took qkv 37.9 -> 19.7 us and gate_up 78.8 -> 74.1 (bf16
# 20.1 / 83.1); o_proj and down were fastest with 2 programs per SM (15.4 / 39.0 us against
# 38.1 / 69.6 before; bf16 14.6 / 46.2) and this config was not in their best three. At 16
# rows triton_wna16's row was already the best.
GEMM_CONFIGS = [(33, 64, (64, 64, 128, 4, 3, 4, 8))]


def _gemm_config(m: int) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM split-K aims for (0: no
    split), least inputs a split takes per row) for ``_gemm`` at m rows: the row of
    ``GEMM_CONFIGS`` that covers m, else ``triton_wna16``'s GEMM table and split sizes."""
    from pagedllm.quant import triton_wna16 as wq
    own = next((cfg for least, most, cfg in GEMM_CONFIGS if least <= m <= most), None)
    if own is not None:
        return own
    _, block_m, block_n, block_k, warps, stages, *rest = next(
        c for c in wq.GEMM_CONFIGS if m <= c[0])
    waves = (rest[0] if rest else wq.GEMM_WAVES) if m <= wq.GEMM_SPLIT_MAX_ROWS else 0
    return block_m, block_n, block_k, warps, stages, waves, wq.SPLIT_K_PER_ROW


def _gemm(x: torch.Tensor, words: torch.Tensor, qzeros: torch.Tensor | None,
          scales: torch.Tensor, group_size: int, zero_offset: int,
          config: tuple | None = None) -> tuple[torch.Tensor, bool]:
    """x [M, K] @ W through ``_gemm_kernel`` at ``_gemm_config`` (``config`` overrides it:
    tuning), in ``_splits``' equal whole-group splits: (out [M, N] in x's dtype, False) or
    (fp32 partial sums [S, M, N], True)."""
    from pagedllm.quant import triton_wna16 as wq
    m, k = x.shape
    n = words.shape[0] * 16
    group, one_row = _group(k, group_size)
    block_m, block_n, block_k, warps, stages, waves, per_row = config or _gemm_config(m)
    while group % block_k:  # a K tile lies in one group (groups are whole 64-input tiles)
        block_k //= 2
    while n % block_n:  # the kernel reads words, scales and zeros of whole column tiles
        block_n //= 2  # (N % 16 == 0: stops at 16 at the latest)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits = _splits(m, k, group, tiles, waves * _sm_count(x.device), wq.SPLIT_MIN_K,
                     per_row)
    k_split = k // splits
    out = torch.empty(splits, m, n, device=x.device,
                      dtype=x.dtype if splits == 1 else torch.float32)
    zeros = qzeros if qzeros is not None else scales
    _gemm_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)](
        x, words, zeros, scales, out, m, n, k, k_split, zero_offset, x.stride(0),
        out.stride(1), out.stride(0), 0 if one_row else zeros.stride(0),
        0 if one_row else scales.stride(0), GROUP=group, HAS_ZEROS=qzeros is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return (out[0], False) if splits == 1 else (out, True)


def dequantize(words: torch.Tensor, qzeros: torch.Tensor | None, scales: torch.Tensor,
               group_size: int, zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """W^T [N, K] in ``dtype`` from the layout, one launch (prefill: then cuBLAS)."""
    n, k = words.shape[0] * 16, words.shape[1] * 64
    group, one_row = _group(k, group_size)
    out = torch.empty(n, k, dtype=dtype, device=words.device)
    zeros = qzeros if qzeros is not None else scales
    block = 256
    _dequant_kernel[(triton.cdiv(n * k // 8, block),)](
        words, zeros, scales, out, n, k, zero_offset, 0 if one_row else zeros.stride(0),
        0 if one_row else scales.stride(0), out.stride(0), GROUP=group,
        HAS_ZEROS=qzeros is not None, BLOCK=block, num_warps=4)
    return out


def w4_matmul(x: torch.Tensor, words: torch.Tensor, qzeros: torch.Tensor | None,
              scales: torch.Tensor, group_size: int, zero_offset: int, *,
              bias: torch.Tensor | None = None, gated: bool = False,
              config: tuple | None = None) -> torch.Tensor:
    """x [..., K] @ W for a layer in the layout: the register-fragment kernel up to
    ``MMA_MAX_ROWS`` rows, ``_gemm_kernel`` below ``DEQUANT_MIN_ROWS``, else dequantized once
    (one launch) and multiplied by cuBLAS. ``config`` overrides the route's config
    (``matmul``'s or ``_gemm``'s: tuning)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    n = words.shape[0] * 16
    if gated and (n // 2) % 16:  # the gate / up halves split a 16-feature block
        out = w4_matmul(x, words, qzeros, scales, group_size, zero_offset, bias=bias,
                        config=config)
        return _epilogue(out, None, True)
    n_out = n // 2 if gated else n
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], n_out)
    if x2.shape[0] <= MMA_MAX_ROWS:
        out = matmul(x2, words, qzeros, scales, group_size, zero_offset, bias, gated,
                     config=config)
    elif x2.shape[0] < DEQUANT_MIN_ROWS and x2.dtype != torch.float32:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out, partial = _gemm(x2, words, qzeros, scales, group_size, zero_offset, config)
        out = _reduce(out, bias, gated, x2.dtype) if partial else _epilogue(out, bias, gated)
    else:
        wt = dequantize(words, qzeros, scales, group_size, zero_offset, x2.dtype)
        out = _epilogue(x2 @ wt.t(), bias, gated)
    return out.reshape(*shape[:-1], n_out)
