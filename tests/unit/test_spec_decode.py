"""Speculative decoding pieces (``pagedllm/spec_decode.py``): the prompt-lookup proposer, the
rejection sampler's output distribution, the scheduler's drafts with exact block ids, and the
flags' start-up checks."""
import pytest
import torch

from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput
from pagedllm.core.request import Request
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode import NgramProposer, SpecRows, SpecSettings, propose_ngram, verify


def test_propose_ngram_takes_the_first_earlier_match_longest_n_first():
    # last 2 tokens (3, 4) occur at 2 and 6: the first occurrence's followers are drafted
    assert propose_ngram([1, 2, 3, 4, 9, 8, 3, 4, 5, 3, 4], 3, 3, 1) == [9, 8, 3]
    # n = 3 (2, 3, 4) matches at 1 before n = 2 is tried: followers of that match
    assert propose_ngram([1, 2, 3, 4, 7, 0, 3, 4, 6, 2, 3, 4], 2, 3, 1) == [7, 0]
    # the draft is cut at the end of the sequence and at num_tokens
    assert propose_ngram([5, 6, 5], 4, 2, 1) == [6, 5]
    assert propose_ngram([5, 6, 5, 6], 1, 2, 1) == [5]
    # no match for any n in [min, max]; min above every match length
    assert propose_ngram([1, 2, 3, 4], 3, 3, 1) == []
    assert propose_ngram([1, 2, 9, 1, 2], 3, 3, 3) == []
    assert propose_ngram([1, 2, 3], 0, 3, 1) == [] and propose_ngram([4], 3, 3, 1) == []


def test_ngram_proposer_buffers_match_the_plain_search():
    """The per-request buffers give what a search over the whole list gives, as the
    sequence grows past the buffer, after it shrinks, and per request."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (300,), generator=gen).tolist()
    proposer = NgramProposer(3, 1)
    for end in list(range(2, 300, 7)) + [150, 151]:  # 150: shorter than the buffer's view
        assert proposer.propose("a", tokens[:end], 4) == propose_ngram(tokens[:end], 4, 3, 1)
        assert proposer.propose("b", tokens[::-1][:end], 2) == \
            propose_ngram(tokens[::-1][:end], 2, 3, 1)
    proposer.forget("a")
    assert proposer.propose("a", [1, 2, 1], 4) == [2, 1]


class _State:
    def __init__(self, params, num_output_tokens=0):
        self.req_id = "r"
        self.sampling_params = params
        self.num_output_tokens = num_output_tokens


def _verify(*args):
    return verify(*args)[0]  # the tokens


def test_greedy_verification_accepts_the_matching_prefix():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 2, 9]):
        logits[row, best] = 5.0
    state = _State(SamplingParams(temperature=0))
    gen = torch.Generator().manual_seed(0)
    assert _verify(logits, [SpecRows(state, [3, 7, 1], 0)], gen, 10) == [[3, 7, 2]]
    assert _verify(logits, [SpecRows(state, [3, 7, 2], 0)], gen, 10) == [[3, 7, 2, 9]]
    assert _verify(logits, [SpecRows(state, [4, 7, 2], 0)], gen, 10) == [[3]]
    # two requests, rows one after the other
    two = _verify(torch.cat([logits[:2], logits]), [SpecRows(state, [3], 0),
                                                   SpecRows(state, [3, 7, 2], 2)], gen, 10)
    assert two == [[3, 7], [3, 7, 2, 9]]


def test_rejection_sampler_keeps_the_target_distribution():
    """Draft token d at position 0 and 1: the first output token is distributed as p0 (d
    accepted with p0(d), else the residual), and when d was accepted the second as p1."""
    torch.manual_seed(0)
    vocab, trials = 6, 20000
    logits = torch.randn(3, vocab) * 1.5
    params = SamplingParams(temperature=0.9, top_k=5)
    state = _State(params)
    gen = torch.Generator().manual_seed(1)
    from pagedllm.sample.metadata import build_filter_metadata
    from pagedllm.sample.sampler import apply_filters
    p = apply_filters(logits.clone(), build_filter_metadata([params] * 3, vocab,
                                                            torch.device("cpu"))).softmax(-1)
    draft = [int(p[0].argmax()), int(p[1].argsort()[-2])]
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(trials):
        out = _verify(logits, [SpecRows(state, draft, 0)], gen, vocab)[0]
        first[out[0]] += 1
        if out[0] == draft[0]:
            second[out[1]] += 1
    assert (first / trials - p[0]).abs().max() < 0.015
    assert (second / second.sum() - p[1]).abs().max() < 0.02
    assert first[p[0] == 0].sum() == 0  # top-k's removed token is never produced


def test_seeded_verification_is_reproducible():
    logits = torch.randn(3, 12)
    state = _State(SamplingParams(temperature=1.0, seed=5), num_output_tokens=4)
    runs = {tuple(_verify(logits, [SpecRows(state, [1, 2], 0)],
                          torch.Generator().manual_seed(g), 12)[0]) for g in range(5)}
    assert len(runs) == 1  # the engine generator plays no part for a seeded request


def _scheduler(budget=64, num_blocks=16, **spec):
    kv = KVCacheManager(num_blocks, 0, 4, False)
    return Scheduler(max_num_batched_tokens=budget, max_num_seqs=8, enable_chunked_prefill=False,
                     preemption_mode="recompute", policy="fcfs", delay_factor=0.0,
                     max_model_len=64, kv_cache_manager=kv,
                     spec=SpecSettings(**{"num_tokens": 3, "ngram_max": 2, **spec}))


def test_scheduler_drafts_allocate_blocks_and_advance_by_the_accepted_tokens():
    sched = _scheduler()
    prompt = [1, 2, 3, 4, 5, 1, 2]
    req = Request("a", prompt, SamplingParams(max_tokens=20))
    sched.add_request(req)
    out = sched.schedule()  # prefill: 7 tokens in blocks 0, 1
    assert out.num_scheduled_tokens == {"a": 7} and not out.spec_token_ids
    sched.update_from_output(out, ModelRunnerOutput(["a"], [[3]]))
    # tokens 1 2 3 4 5 1 2 3: the tail (2, 3) occurred at 1 -> draft 4 5 1
    out = sched.schedule()
    assert out.spec_token_ids == {"a": [4, 5, 1]} and out.num_scheduled_tokens == {"a": 4}
    # 7 computed + 4 scheduled = 11 slots: block 2 added
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", [2])]
    sched.update_from_output(out, ModelRunnerOutput(["a"], [[4, 5, 9]]))  # 2 accepted + 1
    assert req.num_computed_tokens == 7 + 3 and req.all_token_ids[-3:] == [4, 5, 9]
    assert (sched.spec_draft_tokens_total, sched.spec_accepted_tokens_total) == (3, 2)
    out = sched.schedule()  # tail (5, 9) never occurred before, nor 9: a plain decode
    assert out.num_scheduled_tokens == {"a": 1} and not out.spec_token_ids


def test_scheduler_draft_limits():
    # max_tokens: with 2 tokens left only 1 draft token fits (the last one is the bonus)
    sched = _scheduler()
    req = Request("a", [1, 2, 1, 2, 1], SamplingParams(max_tokens=3))
    sched.add_request(req)
    sched.update_from_output(out := sched.schedule(), ModelRunnerOutput(["a"], [[2]]))
    assert sched.schedule().spec_token_ids == {"a": [1]}
    # a draft never preempts: with no free block left it is dropped
    sched = _scheduler(num_blocks=2)
    req = Request("b", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=8))
    sched.add_request(req)
    sched.update_from_output(out := sched.schedule(), ModelRunnerOutput(["b"], [[2]]))
    out = sched.schedule()  # 8 slots in blocks 0-1; a draft would need block 2
    assert out.num_scheduled_tokens == {"b": 1} and not out.spec_token_ids
    # requests that need per-token host work or logprobs do not speculate
    sched = _scheduler()
    for i, params in enumerate([SamplingParams(max_tokens=8, presence_penalty=0.5),
                                SamplingParams(max_tokens=8, logprobs=1),
                                SamplingParams(max_tokens=8, min_tokens=4)]):
        sched.add_request(Request(str(i), [1, 2, 1, 2, 1], params))
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(["0", "1", "2"], [[2], [2], [2]]))
    assert not sched.schedule().spec_token_ids
    # --speculative-disable-by-batch-size: more unfinished requests than that, no drafts
    sched = _scheduler(disable_by_batch_size=1)
    for i in range(2):
        sched.add_request(Request(str(i), [1, 2, 1, 2, 1], SamplingParams(max_tokens=8)))
    sched.update_from_output(out := sched.schedule(), ModelRunnerOutput(["0", "1"], [[2], [2]]))
    assert not sched.schedule().spec_token_ids


@pytest.mark.parametrize("kwargs,match", [
    (dict(speculative_model="draft-model"), "--speculative-model"),
    (dict(speculative_model="[ngram]", ngram_prompt_lookup_max=3), "needs --num-speculative"),
    (dict(num_speculative_tokens=3), "needs --speculative-model"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=2,
          ngram_prompt_lookup_min=3), "larger than"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=2,
          num_scheduler_steps=4), "--num-scheduler-steps"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=2,
          typical_acceptance_sampler_posterior_alpha=0.2), "needs --spec-decoding-acceptance"),
    (dict(spec_decoding_acceptance_method="typical_acceptance_sampler"), "needs --speculative"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=2,
          speculative_draft_tensor_parallel_size=1), "draft models"),
])
def test_speculative_flags_fail_clearly(kwargs, match):
    from pagedllm.arg_utils import EngineArgs
    with pytest.raises(ValueError, match=match):
        EngineArgs(model="pagedllm/demo_model", **kwargs).create_engine_config()


def test_typical_acceptance_keeps_typical_tokens_and_recovers_the_most_likely():
    """A draft token above min(threshold, alpha * exp(-entropy)) is kept; the first one below
    it is replaced by that position's most likely token; greedy rows keep the exact rule."""
    vocab = 5
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05],   # bound 0.09: 2 typical
                                     [0.02, 0.9, 0.04, 0.02, 0.02],  # 0 atypical
                                     [0.2, 0.2, 0.2, 0.2, 0.2]]))
    state = _State(SamplingParams(temperature=1.0))
    gen = torch.Generator().manual_seed(0)
    typical = (0.09, 0.3)
    assert _verify(logits, [SpecRows(state, [2, 0], 0)], gen, vocab, typical) == [[2, 1]]
    out = _verify(logits, [SpecRows(state, [1, 1], 0)], gen, vocab, typical)[0]
    assert out[:2] == [1, 1] and len(out) == 3  # both kept, then a sampled bonus token
    assert _verify(logits[:2], [SpecRows(state, [3], 0)], gen, vocab, typical) == [[0]]
    greedy = _State(SamplingParams(temperature=0))
    assert _verify(logits, [SpecRows(greedy, [2, 1], 0)], gen, vocab, typical) == [[0]]


def test_verification_returns_the_logprobs_the_sampler_would():
    """Logprobs of the emitted tokens: log_softmax of the logits after temperature / top-k
    (greedy rows at temperature 1), the token's rank and the top-k, one entry a token."""
    logits = torch.randn(3, 9)
    params = SamplingParams(temperature=0, logprobs=2)
    state = _State(params)
    draft = [int(logits[0].argmax()), int(logits[1].argmin())]
    tokens, logprobs = verify(logits, [SpecRows(state, draft, 0)], torch.Generator(), 9)
    assert tokens == [[draft[0], int(logits[1].argmax())]]
    lp = torch.log_softmax(logits, -1)
    entries = logprobs["r"]
    assert [e.token_id for e in entries] == tokens[0]
    assert [e.logprob for e in entries] == pytest.approx([lp[0, tokens[0][0]].item(),
                                                          lp[1, tokens[0][1]].item()])
    assert [e.rank for e in entries] == [1, 1]
    assert entries[1].topk_ids == lp[1].topk(2).indices.tolist()
