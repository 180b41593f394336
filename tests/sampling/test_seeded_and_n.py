"""Seeded requests are batch independent; n / best_of fork sequences that share the
prompt's KV blocks (checked through block reference counts)."""
import pytest

from pagedllm import LLM, SamplingParams

PROMPT = "The for statement is used to iterate over the elements of a sequence such as a list"
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02, seed=1234,
                        presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.1,
                        max_tokens=12, ignore_eos=True)


def mixed_params(i):
    kinds = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
             SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True),
             SamplingParams(temperature=0.7, top_p=0.8, max_tokens=9, ignore_eos=True, seed=i),
             SamplingParams(temperature=1.2, top_k=5, repetition_penalty=1.3, max_tokens=11,
                            ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, min_p=0.1, logit_bias={7: 2.0}, max_tokens=8,
                            ignore_eos=True, frequency_penalty=0.5)]
    return kinds[i % len(kinds)]


def test_seeded_request_alone_in_a_mixed_batch_and_chunked(llm, model_path):
    alone = llm.generate([PROMPT], SEEDED, use_tqdm=False)[0].outputs[0].token_ids
    prompts = [f"prompt number {i} " * (1 + i % 4) for i in range(31)] + [PROMPT]
    mixed = llm.generate(prompts, [mixed_params(i) for i in range(31)] + [SEEDED],
                         use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    chunked = LLM(model=model_path, dtype="float32", block_size=8, enable_chunked_prefill=True,
                  max_num_batched_tokens=8, max_num_seqs=4)
    assert chunked.generate([PROMPT], SEEDED, use_tqdm=False)[0].outputs[0].token_ids == alone
    # a different seed gives different tokens
    other = SamplingParams(**{**SEEDED.__dict__, "seed": 99, "all_stop_token_ids": set()})
    assert llm.generate([PROMPT], other, use_tqdm=False)[0].outputs[0].token_ids != alone


class _RefCountProbe:
    """Record, every step, the ref counts of the blocks each sequence of the request holds."""

    def __init__(self, engine):
        self.engine, self.snapshots = engine, []

    def run(self, prompt, params):
        engine = self.engine
        engine.add_request("probe", prompt, params)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
            kv = engine.kv_cache_manager
            self.snapshots.append({rid: [b.ref_cnt for b in blocks]
                                   for rid, blocks in kv.req_to_blocks.items()})
        return outputs[-1]


@pytest.mark.parametrize("n,best_of", [(3, 3), (2, 4)])
def test_n_best_of_share_prompt_blocks(model_path, n, best_of):
    llm = LLM(model=model_path, dtype="float32", block_size=8)
    engine = llm.llm_engine
    free_before = engine.kv_cache_manager.num_free_blocks
    params = SamplingParams(n=n, best_of=best_of, temperature=1.0, max_tokens=10,
                            ignore_eos=True, seed=5)
    probe = _RefCountProbe(engine)
    out = probe.run(PROMPT, params)
    num_prompt = len(out.prompt_token_ids)
    num_shared = (num_prompt - 1) // 8
    assert num_shared >= 1
    forked = next(s for s in probe.snapshots if len(s) == best_of)
    for blocks in forked.values():  # full prompt blocks are held once per sequence
        assert blocks[:num_shared] == [best_of] * num_shared
        assert blocks[num_shared] == 1  # the copied last prompt block is private
    ids = {rid: [b.block_id for b in bl]
           for rid, bl in engine.kv_cache_manager.req_to_blocks.items()}
    assert not ids  # everything freed
    assert engine.kv_cache_manager.num_free_blocks == free_before
    assert [c.index for c in out.outputs] == list(range(n))
    assert len({tuple(c.token_ids) for c in out.outputs}) == n
    assert all(len(c.token_ids) == 10 for c in out.outputs)


def test_best_of_returns_highest_cumulative_logprob(llm):
    params = SamplingParams(n=2, best_of=5, temperature=1.0, max_tokens=6, ignore_eos=True,
                            seed=11, logprobs=0)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    scores = [c.cumulative_logprob for c in out.outputs]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    group_all = llm.generate([PROMPT], SamplingParams(
        n=5, temperature=1.0, max_tokens=6, ignore_eos=True, seed=11, logprobs=0),
        use_tqdm=False)[0]
    best = sorted((c.cumulative_logprob for c in group_all.outputs), reverse=True)[:2]
    assert scores == pytest.approx(best, abs=1e-5)  # same seeds -> same 5 sequences


def test_n_children_match_when_seeded_and_chunked(model_path, llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, ignore_eos=True, seed=21)
    plain = [c.token_ids for c in llm.generate([PROMPT], params, use_tqdm=False)[0].outputs]
    chunked = LLM(model=model_path, dtype="float32", block_size=8, enable_chunked_prefill=True,
                  max_num_batched_tokens=8, max_num_seqs=4)
    again = [c.token_ids for c in chunked.generate([PROMPT], params, use_tqdm=False)[0].outputs]
    assert plain == again


def test_n_with_a_full_cache_falls_back_and_frees(model_path):
    llm = LLM(model=model_path, dtype="float32", block_size=8, num_gpu_blocks_override=8)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=2)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(len(c.token_ids) == 12 for c in out.outputs)
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == 8
