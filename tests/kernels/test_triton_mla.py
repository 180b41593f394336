"""The Triton MLA decode kernel (``attention/triton_mla.py``) against the PyTorch absorbed
attention of ``attention/mla.py`` (``mla_decode_attention_ref``, run in float64 on upcast
inputs), on random paged latent caches with shuffled, non-contiguous block ids.

Without a GPU the kernels run under Triton's interpreter (see test_triton_attention.py for
how ``TRITON_INTERPRET`` is set); tiny latents (rank 32 + rope 16, and the tiny model's
32 + 8) keep that fast. With a GPU the real shapes run too (rank 512 + rope 64, 16 and 128
heads), as does the tiny DeepSeek-V2/V3 model through the engine (eager and CUDA graphs)
against the CPU's greedy tokens. On CPU the tiny models also run through the engine with
``mla.py`` sent to the kernels (interpreted) and give the PyTorch path's tokens. Outputs are
poisoned with NaN first; tolerances are ||out - ref|| / ||ref||.
"""
from __future__ import annotations

import importlib
import importlib.util
import zlib
from types import SimpleNamespace

import pytest
import torch

from tests.kernels.test_triton_attention import (  # noqa: E402  (sets the interpreter up)
    DEVICE, ON_GPU, TOL, _rel_err, shuffled_block_table)

tm = importlib.import_module("pagedllm.attention.triton_mla")
mla = importlib.import_module("pagedllm.attention.mla")

GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (real MLA shapes)")


def _latent_setup(seq_lens: list[int], block_size: int, dim: int, dtype: torch.dtype,
                  gen: torch.Generator):
    """A random latent cache [1, slots, 1, dim] over ``shuffled_block_table``'s blocks;
    block_table [num_seqs, max_blocks] int32."""
    table, num_blocks = shuffled_block_table(seq_lens, block_size, gen)
    cache = torch.randn(1, num_blocks * block_size, 1, dim, generator=gen)
    return cache.to(dtype).to(DEVICE), table


def _check(seq_lens, block_size, rank, rope, heads, dtype, num_splits, fold, seed,
           min_split_tiles=tm.MIN_SPLIT_TILES):
    gen = torch.Generator().manual_seed(seed)
    cache, table = _latent_setup(seq_lens, block_size, rank + rope, dtype, gen)
    q = torch.randn(len(seq_lens), heads, rank + rope, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=(rank + rope) ** -0.5, block_size=block_size, kv_lora_rank=rank)
    out = tm.mla_decode_attention(q, cache, table, lens, num_splits=num_splits,
                                  fold_reduce=fold, min_split_tiles=min_split_tiles, **kw)
    assert out.shape == (len(seq_lens), heads, rank) and out.dtype == dtype
    ref = mla.mla_decode_attention_ref(q.double(), cache.double(), table, lens, **kw)
    err = _rel_err(out, ref)
    print(f"rel err {err:.2e}")
    assert err < TOL[dtype]
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert (out[i] == 0).all()  # seq_len 0 (CUDA-graph padding): zeros
    return out


# (block_size, rank, rope, heads, dtype, num_splits, min_split_tiles)
CASES = [
    (16, 32, 16, 4, torch.float32, 1, 4),
    (32, 32, 16, 4, torch.bfloat16, 3, 1),
    (16, 32, 16, 20, torch.float32, None, 1),  # 20 heads: one 32-row tile, 12 rows masked
    (32, 32, 8, 40, torch.float32, 4, 1),  # the tiny model's 32 + 8; two head tiles
    (16, 24, 16, 3, torch.float16, 2, 1),  # a rank that is no power of two
    (16, 32, 16, 8, torch.bfloat16, 8, 4),  # 4-tile splits: the short rows' later splits empty
]


@pytest.mark.parametrize("fold", [None, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_mla_decode_attention(case, fold):
    block_size, rank, rope, heads, dtype, num_splits, min_tiles = case
    seq_lens = [1, 0, 7 * block_size + 3, 37]  # one key, padding row, many blocks, partial
    _check(seq_lens, block_size, rank, rope, heads, dtype, num_splits, fold,
           zlib.crc32(repr(case).encode()), min_tiles)


@pytest.mark.parametrize("min_tiles", [1, 4])
def test_split_kv_matches_single_pass_and_fold_resets(min_tiles, monkeypatch):
    """Splits (folded or reduced) equal one pass; the partial tiles start as NaN, so a
    combine that read an empty split's (unwritten) tile would show."""
    make = tm._partials

    def poisoned(*args):
        acc, ml = make(*args)
        return (acc.fill_(float("nan")), ml) if acc.dim() == 4 else (acc, ml)
    monkeypatch.setattr(tm, "_partials", poisoned)
    seq_lens = [300, 5, 0, 129]
    one = _check(seq_lens, 16, 32, 16, 8, torch.float32, 1, None, 3)
    many = _check(seq_lens, 16, 32, 16, 8, torch.float32, 7, False, 3, min_tiles)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    for _ in range(2):  # the fold's counters are left zeroed: the second launch is right too
        folded = _check(seq_lens, 16, 32, 16, 8, torch.float32, 7, True, 3, min_tiles)
        torch.testing.assert_close(folded, many, rtol=1e-6, atol=1e-7)


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits,fold,min_tiles", [(1, None, 4), (4, True, 1),
                                                       (8, None, 4), (16, False, 1),
                                                       (64, False, 4), (None, None, 4)])
def test_mla_decode_attention_real_shapes(dtype, heads, block_size, num_splits, fold,
                                          min_tiles):
    seq_lens = [1, 0, 7 * block_size + 3, 37, 2000, 513]
    _check(seq_lens, block_size, 512, 64, heads, dtype, num_splits, fold,
           zlib.crc32(repr((dtype, heads, block_size, num_splits)).encode()), min_tiles)


def test_num_splits_depends_on_shapes_only():
    device = torch.device(DEVICE)
    few = tm.mla_num_splits(1, 128, 256, 16, 512, torch.bfloat16, device)
    assert few > 1 and few & (few - 1) == 0  # batch 1: split, a power of two
    assert 1 * 128 * few * 512 * 4 <= tm.MAX_PARTIAL_BYTES
    assert tm.mla_num_splits(256, 128, 256, 16, 512, torch.bfloat16, device) == 1
    assert tm.mla_num_splits(1, 16, 2, 16, 512, torch.bfloat16, device) == 1  # short table
    # a split keeps MIN_SPLIT_TILES tiles of the longest context (16 tiles of 32 keys: 4)
    assert tm.mla_num_splits(1, 16, 32, 16, 512, torch.bfloat16, device) == 4


@pytest.mark.parametrize("cache_dtype,latent_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)])
def test_write_latent_skips_negative_slots(cache_dtype, latent_dtype):
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(1, 64, 1, 40, generator=gen).to(cache_dtype).to(DEVICE)
    latent = torch.randn(5, 40, generator=gen).to(latent_dtype).to(DEVICE)
    slots = torch.tensor([7, -1, 63, 0, -1], device=DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    expected[0].index_copy_(0, slots[keep], latent[keep].unsqueeze(1).to(cache_dtype))
    tm.write_latent(cache, latent, slots)
    if ON_GPU or cache_dtype == latent_dtype:
        assert torch.equal(cache, expected)
    else:  # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
        torch.testing.assert_close(cache, expected, rtol=2 ** -7, atol=0)


def test_wrappers_reject_bad_shapes():
    cache = torch.zeros(1, 32, 1, 48, device=DEVICE)
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=1.0, block_size=16, kv_lora_rank=32)
    with pytest.raises(ValueError, match="latent dim"):
        tm.mla_decode_attention(torch.zeros(2, 4, 40, device=DEVICE), cache, table, lens, **kw)
    with pytest.raises(ValueError, match="block_table"):
        tm.mla_decode_attention(torch.zeros(3, 4, 48, device=DEVICE), cache, table, lens, **kw)
    with pytest.raises(ValueError, match="MLA cache"):
        tm.mla_decode_attention(torch.zeros(2, 4, 48, device=DEVICE), cache[0], table, lens,
                                **kw)
    with pytest.raises(ValueError, match="slot_mapping"):
        tm.write_latent(cache, torch.zeros(3, 48, device=DEVICE), lens)


@GPU_ONLY
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("eager", [True, False])
def test_tiny_model_cuda_matches_cpu(arch, eager):
    """The engine on CUDA (the Triton MLA decode and latent write; decode steps replayed
    from CUDA graphs unless eager) gives the CPU path's greedy tokens (fp32)."""
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.sampling_params import SamplingParams
    from tests.models.test_deepseek_models import build_tiny_deepseek
    from tests.models.test_models_vs_hf import _prompts
    from tests.models.test_moe_models import MAX_TOKENS, _generate
    path = str(build_tiny_deepseek(arch))
    cpu = _generate(path, _prompts(), block_size=16, device="cpu")
    llm = LLM(model=path, dtype="float32", block_size=16, device="cuda", enforce_eager=eager)
    assert (llm.llm_engine.worker.runner.graphs is None) == eager
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=_prompts(), sampling_params=params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == cpu


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_tiny_model_through_the_kernels_matches_torch_path(arch, monkeypatch):
    """The engine with ``mla.py`` dispatching to the Triton kernels (decode attention and
    latent write; under the interpreter here, on the GPU there) gives the PyTorch path's
    greedy tokens (fp32; splits and their fold as the engine's shapes pick them)."""
    from tests.models.test_deepseek_models import build_tiny_deepseek
    from tests.models.test_models_vs_hf import _prompts
    from tests.models.test_moe_models import _generate
    path = str(build_tiny_deepseek(arch))
    flags = dict(block_size=16, device=DEVICE, enforce_eager=True)
    torch_path = _generate(path, _prompts(), **{**flags, "device": "cpu"})
    calls = []

    def kernels(x):
        calls.append(x.shape)
        return tm
    monkeypatch.setattr(mla, "_kernels", kernels)
    assert _generate(path, _prompts(), **flags) == torch_path
    assert calls  # the kernels ran


def _prefilled_model(arch: str, lens: list[int], block_size: int):
    """The tiny model (HF weights) with ``lens`` prompts prefilled into a fresh latent cache;
    each sequence owns cdiv(len + 1, block_size) blocks (room for one decode token).
    Returns (model, caches, block table rows)."""
    from pagedllm.attention.backend import AttentionMetadata, ForwardContext, PrefillSeq
    from pagedllm.models.registry import resolve_model_class
    from tests.models.test_deepseek_models import _configs, _hf_model
    hf = _hf_model(_configs()[arch])
    model = resolve_model_class([type(hf).__name__])(hf.config, 512)
    model.load_weights(hf.state_dict().items())
    model = model.to(DEVICE).eval()
    spec = model.kv_cache_spec(SimpleNamespace(hf_config=hf.config), 1)
    gen = torch.Generator().manual_seed(11)
    tables, prefills, slots, ids, start = [], [], [], [], 0
    for n in lens:
        need = -(-(n + 1) // block_size)
        first = sum(map(len, tables))
        tables.append(list(range(first, first + need))[::-1])  # blocks in reverse order
        blocks = torch.tensor(tables[-1], device=DEVICE)
        slots += [tables[-1][p // block_size] * block_size + p % block_size for p in range(n)]
        prefills.append(PrefillSeq(start, n, n, blocks[:-(-n // block_size)]))
        ids.append(torch.randint(3, 100, (n,), generator=gen))
        start += n
    caches = [torch.zeros(spec.shape(sum(map(len, tables)) * block_size), device=DEVICE)
              for _ in range(hf.config.num_hidden_layers)]
    meta = AttentionMetadata(block_size, torch.tensor(slots, device=DEVICE), 0, None, None,
                             prefills)
    positions = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    with torch.no_grad():
        model(torch.cat(ids).to(DEVICE), positions, ForwardContext(meta, caches))
    return model, caches, tables


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_padded_decode_step_as_cuda_graphs_run_it(arch, monkeypatch):
    """A decode step padded as ``CUDAGraphRunner`` pads it (rows past the batch: slot -1,
    seq_len 0; the block table as wide as the longest capturable context) gives the real
    rows' hidden states of the unpadded step, finite padding rows, and the same cache: the
    latent write skips slot -1 and the attention reads nothing for seq_len 0."""
    from pagedllm.attention.backend import AttentionMetadata, ForwardContext
    from pagedllm.worker.cuda_graph import CUDAGraphRunner
    monkeypatch.setattr(mla, "_kernels", lambda x: tm)
    lens, block_size = [5, 17, 30], 8
    model, caches, tables = _prefilled_model(arch, lens, block_size)
    n = len(lens)
    ids = torch.tensor([7, 42, 99], device=DEVICE)
    positions = torch.tensor(lens, device=DEVICE)
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, p in zip(tables, lens)], device=DEVICE)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                         device=DEVICE)
    seq_lens = torch.tensor([p + 1 for p in lens], dtype=torch.int32, device=DEVICE)
    eager_caches = [c.clone() for c in caches]
    before_step = [c.clone() for c in caches]
    meta = AttentionMetadata(block_size, slots, n, seq_lens, table, [])
    with torch.no_grad():
        eager = model(ids, positions, ForwardContext(meta, eager_caches))
        runner = CUDAGraphRunner(model, caches, None, block_size, 8, 128, torch.device(DEVICE))
        size = next(s for s in runner.sizes if s > n)  # padding rows: slot -1, seq_len 0
        runner.input_ids[:n], runner.positions[:n] = ids, positions
        runner.slot_mapping[:n], runner.seq_lens[:n] = slots, seq_lens
        runner.block_table[:n, :width] = table
        padded = runner._forward(size)
    assert runner.block_table.shape[1] == 16 > width and size > n
    torch.testing.assert_close(padded[:n], eager, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()
    others = torch.ones(caches[0].shape[1], dtype=torch.bool, device=DEVICE)
    others[slots] = False
    for ours, theirs, before in zip(caches, eager_caches, before_step):
        assert torch.equal(ours[:, others], before[:, others])  # padding rows wrote nothing
        torch.testing.assert_close(ours[:, slots], theirs[:, slots], rtol=1e-5, atol=1e-5)
