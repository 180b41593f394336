"""Speculative decoding with prompt lookup end to end: greedy output with speculation equals
greedy output without it (the same engine's plain path is the oracle), in mixed batches with
requests that do not speculate, with chunked prefill and prefix caching, and with stops
inside an accepted draft; seeded sampling stays reproducible."""
import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.utils.tiny_models import VOCAB_SIZE, build_tiny_model

SPEC = dict(speculative_model="[ngram]", num_speculative_tokens=4, ngram_prompt_lookup_max=3)


def _prompts() -> list[list[int]]:
    """Prompts with repeats in them, so that lookups find drafts, and one without."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, VOCAB_SIZE, (12,), generator=gen).tolist()
    return [base * 3, base[:5] * 4 + [7, 8], torch.randint(3, VOCAB_SIZE, (20,),
                                                            generator=gen).tolist(), base * 2]


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_path(request) -> str:
    return str(build_tiny_model(request.param))


@pytest.mark.parametrize("engine_kw", [dict(block_size=8),
                                       dict(block_size=16, enable_chunked_prefill=True,
                                            max_num_batched_tokens=32, max_num_seqs=8,
                                            enable_prefix_caching=True)])
def test_greedy_with_speculation_equals_plain(model_path, engine_kw):
    prompts = _prompts()
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              # these two never speculate: they decode one token a step in the same batches
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                             presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)]
    plain = LLM(model=model_path, dtype="float32", **engine_kw)
    want = plain.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    spec = LLM(model=model_path, dtype="float32", **engine_kw, **SPEC)
    got = spec.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == ["length"] * 4
    # exact logprobs for the request that asked (it decoded without speculation)
    assert [d[t].logprob for d, t in zip(got[3].outputs[0].logprobs, _tokens(got)[3])] == \
        pytest.approx([d[t].logprob for d, t in zip(want[3].outputs[0].logprobs,
                                                    _tokens(want)[3])], abs=1e-5)
    sched = spec.llm_engine.scheduler
    assert sched.spec_accepted_tokens_total > 0  # drafts were verified and some accepted
    assert sched.spec_draft_tokens_total >= sched.spec_accepted_tokens_total


def test_stop_inside_an_accepted_draft(model_path):
    """A stop token id or max_tokens reached in the middle of the accepted tokens ends the
    request exactly where plain decoding ends it."""
    prompts = _prompts()[:2]
    plain = LLM(model=model_path, dtype="float32", block_size=8)
    free = _tokens(plain.generate(prompt_token_ids=prompts, use_tqdm=False,
                                  sampling_params=SamplingParams(temperature=0, max_tokens=40,
                                                                 ignore_eos=True)))
    params = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free[0][17]]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)]
    want = plain.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    spec = LLM(model=model_path, dtype="float32", block_size=8, **SPEC)
    got = spec.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert [o.outputs[0].finish_reason for o in got] == \
        [o.outputs[0].finish_reason for o in want]


@pytest.mark.parametrize("method", ["rejection_sampler", "typical_acceptance_sampler"])
def test_seeded_sampling_with_speculation_is_reproducible(model_path, method):
    """Both acceptance methods: seeded requests give the same tokens again (in another batch
    order), and greedy requests give the plain greedy tokens."""
    prompts = _prompts()
    llm = LLM(model=model_path, dtype="float32", spec_decoding_acceptance_method=method, **SPEC)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = LLM(model=model_path, dtype="float32")
    assert _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=greedy,
                                use_tqdm=False)) == \
        _tokens(plain.generate(prompt_token_ids=prompts, sampling_params=greedy,
                               use_tqdm=False))
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, ignore_eos=True, seed=7)
    first = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                 use_tqdm=False))
    again = _tokens(llm.generate(prompt_token_ids=prompts[::-1], sampling_params=params,
                                 use_tqdm=False))[::-1]
    assert first == again and all(len(t) == 32 for t in first)


def test_server_with_speculation_streams_the_plain_text_and_reports_metrics():
    openai = pytest.importorskip("openai")  # not in the GPU image

    from tests.utils.server import RemoteServer
    path = str(build_tiny_model("llama"))
    prompt = "a b c a b c a b c a b"
    want = LLM(model=path, max_model_len=128).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    args = ["--max-model-len", "128", "--speculative-model", "[ngram]",
            "--num-speculative-tokens", "3", "--ngram-prompt-lookup-max", "2"]
    with RemoteServer(path, args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        kw = dict(model=path, prompt=prompt, temperature=0, max_tokens=24,
                  extra_body={"ignore_eos": True})
        assert client.completions.create(**kw).choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True,
                                                                                  **kw))
        assert streamed == want
        metrics = server.metrics()
    assert metrics["vllm:spec_decode_num_draft_tokens_total"] > 0
    assert 0 <= metrics["vllm:spec_decode_draft_acceptance_rate"] <= 1
    assert metrics["vllm:spec_decode_num_emitted_tokens_total"] >= \
        metrics["vllm:spec_decode_num_accepted_tokens_total"]
    assert 0 < metrics["vllm:spec_decode_efficiency"] <= 1


def test_logprobs_of_speculated_tokens(model_path):
    """--disable-logprobs-during-spec-decoding False: a request with logprobs speculates too
    and gets the plain path's logprobs (tokens, values, ranks, top alternatives) for every
    token, accepted drafts included."""
    prompts = _prompts()[:2]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3)
    want = LLM(model=model_path, dtype="float32", block_size=8).generate(
        prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    spec = LLM(model=model_path, dtype="float32", block_size=8,
               disable_logprobs_during_spec_decoding=False, **SPEC)
    got = spec.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    assert spec.llm_engine.scheduler.spec_accepted_tokens_total > 0
    for g, w in zip(got, want):
        assert len(g.outputs[0].logprobs) == 32
        for got_pos, want_pos in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert sorted(got_pos) == sorted(want_pos)  # same top-3 + chosen token ids
            for tok, entry in want_pos.items():
                assert got_pos[tok].logprob == pytest.approx(entry.logprob, abs=1e-4)
                assert got_pos[tok].rank == entry.rank
        assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob,
                                                                abs=1e-3)


def test_greedy_with_speculation_under_preemption_and_swap(model_path):
    """Few KV blocks: requests are preempted (recompute, then swap) while some speculate;
    greedy tokens still equal plain decoding's (a preempted request's drafts and their
    slots are simply gone; it re-drafts after resuming)."""
    gen = torch.Generator().manual_seed(3)
    motifs = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in (3, 5, 7)]
    prompts = [motifs[i % 3] * (2 + i % 3) + [i + 3] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for mode in ("recompute", "swap"):
        flags = dict(block_size=8, num_gpu_blocks_override=24, max_num_seqs=8,
                     preemption_mode=mode, swap_space=1)
        want = LLM(model=model_path, dtype="float32", **flags).generate(
            prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        spec = LLM(model=model_path, dtype="float32", **flags, **SPEC)
        got = spec.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert _tokens(got) == _tokens(want), mode
        sched = spec.llm_engine.scheduler
        assert sched.num_preemptions_total > 0 and sched.spec_draft_tokens_total > 0, mode
