"""Penalties, logit_bias / allowed_token_ids, min_tokens and logits processors vs
straightforward per-token reference implementations of their definitions."""
import random

import pytest
import torch

from pagedllm.sample.metadata import build_sampling_metadata
from pagedllm.sample.sampler import apply_logits_ops
from pagedllm.sampling_params import SamplingParams
from tests.sampling.utils import FakeState

VOCAB = 50


def reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM / OpenAI definitions, one token at a time."""
    out = logits.clone()
    for tok in range(VOCAB):
        if tok in prompt or tok in output:
            out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
        count = output.count(tok)
        out[tok] -= frequency * count + presence * (count > 0)
    return out


def random_case(rng, params):
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 15))]
    return FakeState(params, prompt + output, len(prompt), len(output))


def test_penalties_match_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    states = []
    for i in range(24):
        params = SamplingParams(
            temperature=1.0, presence_penalty=rng.uniform(-2, 2) if i % 4 else 0.0,
            frequency_penalty=rng.uniform(-2, 2) if i % 3 else 0.0,
            repetition_penalty=rng.uniform(0.5, 2.0) if i % 2 else 1.0)
        states.append(random_case(rng, params))
    logits = torch.randn(len(states), VOCAB) * 3
    meta = build_sampling_metadata(states, VOCAB, None, torch.device("cpu"))
    got = apply_logits_ops(logits.clone(), meta)
    for row, s in enumerate(states):
        p = s.sampling_params
        expected = reference_penalties(logits[row], s.token_ids[:s.num_prompt_tokens],
                                       s.token_ids[s.num_prompt_tokens:], p.presence_penalty,
                                       p.frequency_penalty, p.repetition_penalty)
        torch.testing.assert_close(got[row], expected, rtol=1e-6, atol=1e-5)


def test_logit_bias_and_allowed_ids_match_reference():
    rng = random.Random(1)
    states, expected_rows = [], []
    logits = torch.randn(6, VOCAB)
    for row in range(6):
        bias = {rng.randrange(VOCAB): rng.uniform(-150, 150) for _ in range(5)} if row % 2 else None
        allowed = rng.sample(range(VOCAB), 7) if row % 3 == 0 else None
        states.append(FakeState(SamplingParams(logit_bias=bias, allowed_token_ids=allowed)))
        exp = logits[row].clone()
        for tok, value in (bias or {}).items():
            exp[tok] += max(-100.0, min(100.0, value))  # clamped like vLLM
        if allowed is not None:
            exp[[t for t in range(VOCAB) if t not in allowed]] = -float("inf")
        expected_rows.append(exp)
    meta = build_sampling_metadata(states, VOCAB, None, torch.device("cpu"))
    got = apply_logits_ops(logits.clone(), meta)
    torch.testing.assert_close(got, torch.stack(expected_rows))


def test_min_tokens_masks_stop_ids_until_reached():
    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    params.update_from_generation_config({2})
    states = [FakeState(params, [1, 5, 9], 2, 1), FakeState(params, [1, 5, 9, 9, 9], 2, 3)]
    meta = build_sampling_metadata(states, VOCAB, None, torch.device("cpu"))
    got = apply_logits_ops(torch.zeros(2, VOCAB), meta)
    assert got[0, 2] == got[0, 7] == -float("inf") and got[0].isfinite().sum() == VOCAB - 2
    assert got[1].isfinite().all()


def test_logits_processors_both_signatures():
    seen = {}

    def two(output_ids, row):
        seen["two"] = list(output_ids)
        row[3] += 10
        return row

    def three(prompt_ids, output_ids, row):
        seen["three"] = (list(prompt_ids), list(output_ids))
        return row * 2

    states = [FakeState(SamplingParams()), FakeState(SamplingParams(logits_processors=[two, three]),
                                                     [4, 5, 6], 2, 1)]
    meta = build_sampling_metadata(states, VOCAB, None, torch.device("cpu"))
    logits = torch.ones(2, VOCAB)
    got = apply_logits_ops(logits.clone(), meta)
    assert seen == {"two": [6], "three": ([4, 5], [6])}
    assert torch.equal(got[0], torch.ones(VOCAB))
    assert got[1, 3] == 22 and got[1, 0] == 2


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty",
                                     "repetition_penalty"])
def test_penalties_change_engine_output(llm, penalty):
    """End to end: a strong penalty changes greedy output and avoids repeated tokens."""
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    strong = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                            **{penalty: 2.0 if penalty != "repetition_penalty" else 100.0})
    outs = llm.generate(["Hello world"] * 2, [base, strong], use_tqdm=False)
    plain, penalized = (o.outputs[0].token_ids for o in outs)
    seen = set(outs[0].prompt_token_ids) if penalty == "repetition_penalty" else set()
    if not any(t in seen or t in plain[:i] for i, t in enumerate(plain)):
        # the premise: the plain output reuses a token. It does here; the GPU image trains
        # its own tiny tokenizer (another tokenizers version), so there "Hello world" has
        # other ids and led to 20 distinct tokens (checked: the penalties were applied)
        pytest.skip(f"the plain greedy output never repeats a token: {penalty} has nothing "
                    "to act on")
    assert plain != penalized
    assert len(set(penalized)) > len(set(plain))
