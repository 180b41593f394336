"""The remaining SamplingParams fields, end to end through LLM.generate."""
import pytest

from pagedllm import RequestOutputKind, SamplingParams

GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)


def gen(llm, prompt, **kwargs):
    return llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)[0]


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    ids = llm.get_tokenizer().encode("The for statement is used to iterate over a list")
    out = gen(llm, {"prompt_token_ids": ids}, truncate_prompt_tokens=4, **GREEDY)
    assert out.prompt_token_ids == ids[-4:]
    assert out.outputs[0].token_ids == gen(llm, {"prompt_token_ids": ids[-4:]},
                                           **GREEDY).outputs[0].token_ids


def test_detokenize_false_gives_ids_without_text(llm):
    out = gen(llm, "Hello", detokenize=False, logprobs=1, **GREEDY).outputs[0]
    assert out.text == "" and len(out.token_ids) == 8
    assert all(lp.decoded_token is None for d in out.logprobs for lp in d.values())


def test_allowed_token_ids_and_logit_bias(llm):
    allowed = [10, 20, 30]
    out = gen(llm, "Hello", temperature=1.0, max_tokens=12, ignore_eos=True, seed=0,
              allowed_token_ids=allowed).outputs[0]
    assert set(out.token_ids) <= set(allowed)
    biased = gen(llm, "Hello", logit_bias={"77": 100}, **GREEDY).outputs[0]  # JSON-style keys
    assert biased.token_ids == [77] * 8


def test_min_tokens_holds_back_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    out = gen(llm, "Hello", temperature=0, max_tokens=6, min_tokens=5,
              logit_bias={eos: 100}).outputs[0]
    assert out.token_ids[:5] != [eos] * 5 and eos not in out.token_ids[:5]
    assert out.token_ids[5] == eos and out.finish_reason == "stop"


def test_out_of_vocab_ids_are_rejected(llm):
    with pytest.raises(ValueError, match="logit_bias"):
        gen(llm, "Hello", logit_bias={10**6: 1.0})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        gen(llm, "Hello", allowed_token_ids=[1, -3])
    with pytest.raises(ValueError, match="lm-format-enforcer"):  # it has no grammar parser
        gen(llm, "Hello", guided_decoding={"grammar": 'root ::= "a"',
                                           "backend": "lm-format-enforcer"})
    assert not llm.llm_engine.has_unfinished_requests()


def test_delta_outputs_with_n_and_logprobs(llm):
    engine = llm.llm_engine
    params = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=5, ignore_eos=True,
                            logprobs=1, output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", "Hello", params)
    tokens, logprobs = {0: [], 1: []}, {0: [], 1: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                tokens[c.index] += c.token_ids
                logprobs[c.index] += c.logprobs
    assert all(len(tokens[i]) == 5 and len(logprobs[i]) == 5 for i in (0, 1))
    assert all(t in d for i in (0, 1) for t, d in zip(tokens[i], logprobs[i]))
