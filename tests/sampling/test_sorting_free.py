"""The CPU sampler's sorting-free paths (``sample/ops/sorting_free.py``) against the
definition: chi-square goodness of fit (p < 0.001 fails, seeded generators so every test is
deterministic) on ties, top_p close to 1, min-p, combined filters, wide vocabularies that
span many blocks, the rejection fallback, permuted batches; exact checks of the building
blocks (block-prefiltered top-k, block-sum inverse CDF, seeded uniforms)."""
import warnings

import numpy as np
import pytest
import torch

from pagedllm.sample import sampler as sampler_mod
from pagedllm.sample.metadata import MetadataBuilder, build_sampling_metadata
from pagedllm.sample.ops.random_sample import (draw_cpu, inverse_cdf, seed_array,
                                                seeded_uniforms)
from pagedllm.sample.ops.top_k_top_p import top_values
from pagedllm.sample.sampler import Sampler
from pagedllm.sampling_params import SamplingParams
from tests.sampling.test_sampler_stats import ALPHA, chi_square_p
from tests.sampling.utils import FakeState

CPU = torch.device("cpu")


def reference(logits: torch.Tensor, temperature=1.0, top_k=-1, top_p=1.0,
              min_p=0.0) -> torch.Tensor:
    """The target distribution in float64, written out with the sampler's tie rule (every
    token tied with a threshold is kept): top-k keeps logits >= the k-th largest; top-p
    (on the top-k tokens, renormalised) keeps logits >= the value at the last position of the
    descending order whose mass before it is < top_p; min-p keeps p >= min_p * p_max."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    desc = z.sort(descending=True).values
    if 0 < top_k < z.numel():
        keep &= z >= desc[top_k - 1]
        desc = desc[:top_k]
    if top_p < 1.0:
        probs = desc.softmax(-1)
        before = probs.cumsum(-1) - probs
        last = int((before < top_p).sum()) - 1
        keep &= z >= desc[max(last, 0)]
    if min_p > 0:
        keep &= z >= z.max() + np.log(min_p)
    probs = z.softmax(-1) * keep
    return probs / probs.sum()


def draw(logits: torch.Tensor, params: SamplingParams, num_draws: int, seed: int = 0,
         permute: bool = False) -> torch.Tensor:
    """Counts of each token over ``num_draws`` rows sharing one logits row."""
    vocab = logits.shape[-1]
    states = [FakeState(params) for _ in range(num_draws)]
    gen = torch.Generator().manual_seed(seed)
    meta = MetadataBuilder(vocab, gen, CPU, permute=permute).build(states)
    ids = Sampler()(logits.repeat(num_draws, 1), meta).sampled_ids
    return torch.bincount(ids, minlength=vocab).double()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    assert counts[probs == 0].sum() == 0, "a token outside the kept set was sampled"
    if (probs > 0).sum() > 1:
        assert chi_square_p(counts, probs) > ALPHA


TIES = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, -2.0])
STEEP = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -4.0, -9.0])  # last token ~2e-6


@pytest.mark.parametrize("logits,kwargs", [
    (TIES, dict(top_k=2)),  # k-th value tied: all three 1.0 tokens are kept
    (TIES, dict(top_k=4)),  # boundary just after the tie: no tie at k
    (TIES, dict(top_k=5, temperature=0.7)),  # tie at k between the two 0.0 tokens
    (TIES, dict(top_p=0.5)),  # top-p stops inside the tied group: the whole group is kept
    (TIES, dict(top_p=0.5, top_k=3)),
    (TIES, dict(min_p=0.3)),
    (TIES, dict(top_p=0.75, min_p=0.2, temperature=1.5)),
    (STEEP, dict(top_p=0.99)),
    (STEEP, dict(top_p=0.999)),  # close to 1: drops only the last two tokens
    (STEEP, dict(top_p=0.99999)),  # drops only the last token
    (STEEP, dict(top_k=7, top_p=0.999, min_p=1e-3)),
    (STEEP, dict(top_p=0.05)),  # smaller than the largest probability: one token
    (torch.zeros(8), dict(top_p=0.3)),  # every logit tied: all kept
    (torch.zeros(8), dict(top_k=3)),
])
def test_filters_with_ties_and_top_p_near_one(logits, kwargs):
    params = SamplingParams(**{"temperature": 1.0, **kwargs})
    assert_matches(draw(logits, params, 40_000), reference(logits, **{"temperature": 1.0,
                                                                     **kwargs}))


@pytest.mark.parametrize("num_rounds", [1, 2])
def test_rows_rejected_too_often_take_the_sorted_path(monkeypatch, num_rounds):
    """With one (or two) rejection rounds, many rows finish on the sorted path: the mixture
    of accepted rows and fallback rows still has the target distribution."""
    monkeypatch.setattr(sampler_mod, "NUM_ROUNDS", num_rounds)
    params = SamplingParams(temperature=1.0, top_p=0.6, min_p=0.1)
    assert_matches(draw(STEEP, params, 40_000), reference(STEEP, top_p=0.6, min_p=0.1))


def binned(counts: torch.Tensor, probs: torch.Tensor, num_bins: int = 30):
    """Counts and probabilities summed over groups of kept tokens of about equal mass (a
    wide flat row has too little mass per token for a per-token test)."""
    order = (-probs).argsort()[:int((probs > 0).sum())]
    mass_before = probs[order].cumsum(0) - probs[order]
    bins = (mass_before * num_bins).long().clamp(max=num_bins - 1)
    return (torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, counts[order]),
            torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, probs[order]))


@pytest.mark.parametrize("vocab,scale,kwargs", [
    (3000, 1e-6, dict(top_p=0.9)),  # nearly flat: the nucleus is ~90% of the vocabulary
    (3000, 3.0, dict(top_p=0.9, temperature=0.8)),  # peaked
    (3000, 3.0, dict(top_p=0.95, min_p=0.01)),
    (3001, 1.0, dict(top_k=40, top_p=0.9)),  # candidates; vocab not a multiple of blocks
    (5000, 1.0, dict(top_k=200, min_p=0.05)),
    (5003, 2.0, dict(min_p=0.02)),
    (3000, 1.0, dict(top_k=300)),  # above CANDIDATE_MAX_K: the sorted path
])
def test_wide_vocabularies(vocab, scale, kwargs):
    torch.manual_seed(vocab)
    logits = torch.randn(vocab) * scale
    params = SamplingParams(**{"temperature": 1.0, **kwargs})
    counts = sum(draw(logits, params, 10_000, seed=s) for s in range(4))
    probs = reference(logits, **{"temperature": 1.0, **kwargs})
    assert counts[probs == 0].sum() == 0, "a token outside the kept set was sampled"
    if (probs > 0).sum() <= 100:
        assert_matches(counts, probs)
    else:
        assert_matches(*binned(counts, probs))


@pytest.mark.parametrize("logprobs", [None, 1])
def test_permuted_batches_match_the_definition(logprobs):
    """Rows of every path in one permuted batch: each row's draws follow its target. With a
    logprobs row every row's logits are scaled up front (the logprobs are of the scaled,
    filtered logits)."""
    kinds = [dict(temperature=0), dict(top_k=3, temperature=0.7), dict(top_p=0.6),
             dict(min_p=0.2, temperature=1.5), dict(top_p=0.7, temperature=0.5), dict(),
             dict(top_k=2, logprobs=logprobs), dict(temperature=0.8),
             dict(top_p=0.8, min_p=0.1)]
    per_kind = 6_000
    states = [FakeState(SamplingParams(**{"temperature": 1.0, **kinds[i % len(kinds)]}))
              for i in range(per_kind * len(kinds))]
    meta = MetadataBuilder(8, torch.Generator().manual_seed(0), CPU, permute=True).build(states)
    assert meta.order is not None
    logits = TIES.repeat(len(states), 1)[meta.order]
    out = Sampler()(logits, meta)
    ids = out.sampled_ids.view(per_kind, len(kinds))  # state order: kind = column
    assert (ids[:, 0] == 0).all()  # greedy
    for col, kwargs in enumerate(kinds[1:], start=1):
        kwargs = {k: v for k, v in kwargs.items() if k != "logprobs"}
        counts = torch.bincount(ids[:, col], minlength=8).double()
        assert_matches(counts, reference(TIES, **kwargs))
    if logprobs is None:
        assert out.logprobs is None
        return
    # logprobs come back in state order, of the filtered distribution (top_k=2: 4 kept)
    lp_rows = torch.arange(6, len(states), len(kinds))
    expected = reference(TIES, top_k=2).log().float()
    torch.testing.assert_close(out.logprobs.logprobs[lp_rows],
                               expected[out.sampled_ids[lp_rows]])


def test_top_values_equals_topk():
    torch.manual_seed(0)
    for vocab, k in [(32000, 51), (151936, 41), (50257, 21), (5000, 9), (300, 20)]:
        x = torch.randn(6, vocab)
        x[1] = x[1].round()  # many ties
        x[2, ::2] = -float("inf")
        x[3, :] = -float("inf")
        x[3, :k // 2] = 1.0  # fewer finite values than k
        values, ids = top_values(x, k)
        expected = x.topk(k, dim=-1).values
        assert torch.equal(values, expected)
        assert torch.equal(x.gather(1, ids)[values > -float("inf")],
                           values[values > -float("inf")])


@pytest.mark.parametrize("draw", ["torch", "cpu", "cpu-parts"])
@pytest.mark.parametrize("vocab", [1000, 1024])  # a short last block or none
def test_inverse_cdf_across_blocks(draw, vocab):
    def sample(w, u):
        if draw == "torch":
            ids, total = inverse_cdf(w, u)
            return ids, total.numpy()
        half = w.shape[0] // 2
        parts = [w[:half].contiguous(), w[half:].contiguous()] if draw == "cpu-parts" else w
        ids, total = draw_cpu(parts, u.numpy())
        return torch.from_numpy(ids), total

    torch.manual_seed(0)
    w = torch.zeros(3, vocab)
    w[0, [0, 127, 128, 500, vocab - 1]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w[1] = torch.rand(vocab) * (torch.rand(vocab) < 0.1)
    w[2, vocab - 1] = 1.0
    n = 30_000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for row in range(3):
        ids, total = sample(w[row].repeat(n, 1), u)
        assert np.allclose(total, w[row].double().sum().item())
        counts = torch.bincount(ids, minlength=vocab).double()
        assert_matches(counts, w[row].double() / w[row].double().sum())
    edge = torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64)
    assert sample(w[0].repeat(2, 1), edge)[0].tolist() == [0, vocab - 1]


def test_seeded_uniforms_depend_only_on_seed_index_and_column():
    seeds = seed_array([1, 2, 1, -5, 2 ** 70 + 3])
    indices = np.array([0, 0, 1, 7, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # uint64 wrap-around must not warn
        u = seeded_uniforms(seeds, indices, 5)
    assert u.shape == (5, 5) and (u >= 0).all() and (u < 1).all()
    assert len(np.unique(u)) == u.size
    again = seeded_uniforms(seeds[[4, 0]], indices[[4, 0]], 3)
    assert np.array_equal(again, u[[4, 0], :3])
    many = seeded_uniforms(seed_array([7] * 20_000), np.arange(20_000), 1)[:, 0]
    counts = np.histogram(many, bins=10, range=(0, 1))[0]
    assert chi_square_p(torch.tensor(counts, dtype=torch.float64),
                        torch.full((10,), 0.1, dtype=torch.float64)) > ALPHA


def test_seeded_rows_do_not_depend_on_the_batch():
    """Same seed and token index -> same token, alone or in a permuted mixed batch, on a
    nearly flat wide row (rejection rounds, block sums) and with top-k candidates."""
    torch.manual_seed(0)
    vocab = 32000
    row = torch.randn(vocab) * 1e-6
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=11),
              SamplingParams(temperature=1.0, top_k=40, min_p=0.05, seed=12),
              SamplingParams(temperature=0.9, min_p=0.5, seed=13)]
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.5, top_p=0.5)]
    for index in range(6):
        alone = []
        for params in seeded:
            meta = build_sampling_metadata([FakeState(params, num_output_tokens=index)],
                                           vocab, None, CPU)
            alone.append(Sampler()(row[None].clone(), meta).sampled_ids.item())
        states = [FakeState(p, num_output_tokens=index) for p in others + seeded + others]
        meta = MetadataBuilder(vocab, torch.Generator().manual_seed(index), CPU,
                               permute=True).build(states)
        logits = row.repeat(len(states), 1)
        logits = logits[meta.order] if meta.order is not None else logits
        mixed = Sampler()(logits, meta).sampled_ids.tolist()
        assert mixed[3:6] == alone


def test_cached_metadata_follows_growing_histories():
    """The builder keeps the fixed parts across steps; penalties see each step's outputs."""
    params = [SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3,
                             repetition_penalty=1.3, seed=3),
              SamplingParams(temperature=0.0, repetition_penalty=2.0, min_tokens=2,
                             stop_token_ids=[4])]
    states = [FakeState(p, [1, 2, 3], 3, 0) for p in params]
    builder = MetadataBuilder(50, None, CPU, permute=True)
    logits = torch.randn(2, 50)
    for step in range(80):  # outputs outgrow the buffer's first width (64)
        cached = builder.build(states)
        fresh = build_sampling_metadata(states, 50, None, CPU)
        order = cached.order if cached.order is not None else torch.arange(2)
        got = sampler_mod.apply_logits_ops(logits[order].clone(), cached)
        expected = sampler_mod.apply_logits_ops(logits.clone(), fresh)[order]
        torch.testing.assert_close(got, expected)
        assert cached.seeded.indices.tolist() == [step]
        for s in states:
            s.token_ids.append((step * 7 + len(s.token_ids)) % 50)
            s.num_output_tokens += 1


@pytest.mark.parametrize("guided_rows", [[0, 1, 2, 3], [0, 2], [3]])
def test_guided_masks_follow_the_permutation(guided_rows):
    from pagedllm.sample.ops.guided import apply_guided_mask
    from pagedllm.worker.step_sampler import _guided_in_order
    states = [FakeState(SamplingParams(**kw)) for kw in (
        dict(temperature=1.0, top_p=0.5), dict(temperature=0), dict(temperature=1.0, top_k=3),
        dict(temperature=1.0))]
    meta = MetadataBuilder(8, None, CPU, permute=True).build(states)
    assert meta.order is not None
    logits = torch.randn(4, 8)
    rows = torch.tensor(guided_rows)
    mask = torch.zeros(len(guided_rows), 8).masked_fill_(torch.rand(len(guided_rows), 8) < 0.5,
                                                         -float("inf"))
    expected = apply_guided_mask(logits.clone(), rows, mask)[meta.order]
    prow, pmask = _guided_in_order(rows, mask, meta)
    assert torch.equal(apply_guided_mask(logits[meta.order], prow, pmask), expected)


def test_chunked_max_indices_is_the_first_maximum():
    """The two-stage argmax of few wide rows (CUDA) equals max().indices, ties included: the
    first maximum wins across chunks and within one."""
    from pagedllm.sample.sampler import _argmax_chunks, chunked_max_indices
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 128256, generator=gen)
    logits[1, [7, 90000]] = 50.0  # tie across chunks
    logits[2, [1000, 1001]] = 50.0  # tie inside one chunk
    logits[3] = 0.0  # every entry tied
    chunks = _argmax_chunks(128256)
    assert chunks == 256
    got = chunked_max_indices(logits, chunks)
    assert torch.equal(got, logits.max(dim=-1).indices)
    assert got[1:4].tolist() == [7, 1000, 0]
    assert _argmax_chunks(32000) == 1 and _argmax_chunks(131071) == 1
