"""Logprobs and prompt_logprobs vs log_softmax of Hugging Face transformers' logits (fp32,
1e-4), in vLLM 0.6.3's shape: per position {token id: Logprob(logprob, rank, decoded)}
holding the sampled (prompt) token and the top-k. Logprobs are of the processed
distribution: at temperature T they are log_softmax(logits / T)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams

PROMPTS = ["The for statement is used to iterate over the elements of a sequence", "Hello"]


@pytest.fixture(scope="module")
def hf_model(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def hf_logprobs(hf_model, token_ids, temperature=1.0):
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0].float()
    return (logits / temperature).log_softmax(-1)  # [len, vocab]


def check_position(entry, expected_row, token_id, k):
    assert token_id in entry and len(entry) in (k, k + 1)
    assert abs(entry[token_id].logprob - expected_row[token_id].item()) < 1e-4
    assert entry[token_id].rank == int((expected_row > expected_row[token_id]).sum()) + 1
    top = expected_row.topk(k)
    for rank, (lp, tid) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        assert abs(entry[tid].logprob - lp) < 1e-4
        if tid != token_id:
            assert entry[tid].rank == rank
    assert all(isinstance(v.decoded_token, str) for v in entry.values())


@pytest.mark.parametrize("engine_kwargs", [
    {}, dict(enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)])
def test_logprobs_and_prompt_logprobs_match_hf(model_path, hf_model, engine_kwargs):
    llm = LLM(model=model_path, dtype="float32", block_size=8, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5,
                            prompt_logprobs=4)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        prompt, gen = out.prompt_token_ids, out.outputs[0]
        expected = hf_logprobs(hf_model, prompt + gen.token_ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            check_position(out.prompt_logprobs[pos], expected[pos - 1], prompt[pos], 4)
        assert len(gen.logprobs) == len(gen.token_ids)
        for t, token_id in enumerate(gen.token_ids):
            check_position(gen.logprobs[t], expected[len(prompt) - 1 + t], token_id, 5)
        total = sum(gen.logprobs[t][tid].logprob for t, tid in enumerate(gen.token_ids))
        assert abs(gen.cumulative_logprob - total) < 1e-4


def test_sampled_logprobs_are_after_temperature(llm, hf_model):
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=5, ignore_eos=True, logprobs=2)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    gen = out.outputs[0]
    expected = hf_logprobs(hf_model, out.prompt_token_ids + gen.token_ids, temperature=0.7)
    for t, token_id in enumerate(gen.token_ids):
        check_position(gen.logprobs[t], expected[len(out.prompt_token_ids) - 1 + t], token_id, 2)


def test_no_logprobs_means_none(llm):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert out.prompt_logprobs is None
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None


def test_logprobs_zero_gives_only_the_sampled_token(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert [list(d) for d in out.logprobs] == [[t] for t in out.token_ids]


def test_max_logprobs_cap(model_path):
    llm = LLM(model=model_path, dtype="float32", max_logprobs=3)
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{field}=4 .*max-logprobs"):
            llm.generate(["Hello"], SamplingParams(**{field: 4}), use_tqdm=False)
    assert llm.generate(["Hello"], SamplingParams(logprobs=3, max_tokens=2),
                        use_tqdm=False)[0].finished


def test_prompt_logprobs_skip_the_prefix_cache(model_path, hf_model):
    llm = LLM(model=model_path, dtype="float32", block_size=8, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2), use_tqdm=False)  # fills the cache
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    expected = hf_logprobs(hf_model, out.prompt_token_ids)
    assert all(out.prompt_logprobs[p] is not None for p in range(1, len(out.prompt_token_ids)))
    pos = len(out.prompt_token_ids) - 1
    check_position(out.prompt_logprobs[pos], expected[pos - 1], out.prompt_token_ids[pos], 1)
