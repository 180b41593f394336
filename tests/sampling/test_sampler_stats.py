"""Statistical tests of the sampler: empirical token frequencies vs the exact target
distribution of temperature, top-k, top-p and min-p sampling.

Chi-square goodness of fit on 40,000 draws from a fixed 8-token distribution, engine
generator seeded (so the test is deterministic); a test fails when p < 0.001 (significance
level 0.1%). Categories with zero target probability must never be drawn.
"""
import pytest
import torch

from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import Sampler
from pagedllm.sampling_params import SamplingParams
from tests.sampling.utils import FakeState

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
NUM_DRAWS = 40_000
ALPHA = 1e-3


def target(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The definition, written out (vLLM's order): softmax at the temperature, keep the top
    k and renormalise, keep the smallest prefix whose mass reaches top_p and renormalise,
    drop tokens below min_p * max prob and renormalise."""
    probs = (LOGITS / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if top_k > 0:
        probs[order[top_k:]] = 0
        probs = probs / probs.sum()
    keep, mass = [], 0.0
    for tok in order:
        if mass >= top_p:
            break
        keep.append(tok)
        mass += probs[tok].item()
    kept = torch.zeros(8)
    kept[keep] = probs[keep]
    kept = kept / kept.sum()
    kept[kept < min_p * kept.max()] = 0
    return kept / kept.sum()


def draw(params: SamplingParams) -> torch.Tensor:
    states = [FakeState(params) for _ in range(NUM_DRAWS)]
    gen = torch.Generator().manual_seed(0)
    meta = build_sampling_metadata(states, 8, gen, torch.device("cpu"))
    ids = Sampler()(LOGITS.repeat(NUM_DRAWS, 1), meta).sampled_ids
    return torch.bincount(ids, minlength=8).double()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    support = probs > 0
    expected = probs[support].double() * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(support.sum() - 1))
    return torch.special.gammaincc(dof / 2, stat / 2).item()


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0),
    dict(temperature=1.0, top_k=3), dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.0, min_p=0.2), dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05),
])
def test_frequencies_match_target(kwargs):
    counts, probs = draw(SamplingParams(**kwargs)), target(**kwargs)
    assert counts[probs == 0].sum() == 0, "a filtered token was sampled"
    assert chi_square_p(counts, probs) > ALPHA


def test_chi_square_detects_a_wrong_distribution():
    counts = draw(SamplingParams(temperature=1.0))
    assert chi_square_p(counts, target(temperature=0.8)) < ALPHA


def test_greedy_rows_take_argmax():
    states = [FakeState(SamplingParams(temperature=0)), FakeState(SamplingParams())]
    meta = build_sampling_metadata(states, 8, torch.Generator().manual_seed(0),
                                   torch.device("cpu"))
    logits = torch.randn(2, 8)
    expected = logits[0].argmax().item()
    assert Sampler()(logits, meta).sampled_ids[0].item() == expected


def test_threshold_filtering_equals_full_sort():
    """The per-row threshold form gives the sort-and-mask definition's mask on peaked and
    flat rows, with and without top-k."""
    from pagedllm.sample.ops.top_k_top_p import _filter_sorted, apply_top_k_top_p
    torch.manual_seed(0)
    vocab = 3000
    logits = torch.randn(8, vocab)
    logits[::2] *= 12  # peaked rows: the nucleus fits in the candidates
    top_k = torch.tensor([vocab, vocab, 5, 2000, vocab, 1500, vocab, 40])
    top_p = torch.tensor([0.9, 0.95, 1.0, 0.8, 0.5, 0.99, 1.0, 0.7])
    rows = torch.arange(8)
    got = apply_top_k_top_p(logits.clone(), rows, top_k, top_p, None)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    expected = torch.empty_like(logits).scatter_(-1, order,
                                                  _filter_sorted(sorted_logits, top_k, top_p))
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got[got.isfinite()], expected[expected.isfinite()])
