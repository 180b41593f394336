"""LLM.beam_search equals transformers' generate(num_beams, length_penalty, do_sample=False):
same sequences, same order, same scores."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedllm import LLM
from pagedllm.sampling_params import BeamSearchParams

PROMPTS = ["Hello there", "def f(x):"]


@pytest.fixture(scope="module")
def hf_model(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def hf_beams(hf_model, ids, width, max_tokens, length_penalty, eos):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), num_beams=width, do_sample=False,
                                num_return_sequences=width, max_new_tokens=max_tokens,
                                length_penalty=length_penalty, early_stopping=False,
                                eos_token_id=eos, pad_token_id=0, output_scores=True,
                                return_dict_in_generate=True)
    seqs = []
    for row in out.sequences.tolist():
        gen = row[len(ids):]
        seqs.append(gen[:gen.index(eos) + 1] if eos in gen else gen)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("width,max_tokens,length_penalty", [(3, 10, 1.0), (4, 8, 0.5),
                                                             (2, 8, 2.0)])
def test_beam_search_equals_transformers(model_path, hf_model, width, max_tokens,
                                         length_penalty):
    llm = LLM(model=model_path, dtype="float32", enable_prefix_caching=True)
    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                              length_penalty=length_penalty)
    outputs = llm.beam_search([tok.encode(p) for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outputs):
        ids = tok.encode(prompt)
        expected, scores = hf_beams(hf_model, ids, width, max_tokens, length_penalty,
                                    tok.eos_token_id)
        assert [s.tokens[len(ids):] for s in out.sequences] == expected
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
        assert out.sequences[0].text == tok.decode(out.sequences[0].tokens)


def test_beam_search_with_eos_equals_transformers(model_path, hf_model):
    """Make a frequent token the EOS so that beams finish early (HF's finishing rules)."""
    llm = LLM(model=model_path, dtype="float32", enable_prefix_caching=True)
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    plain = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=6))[0]
    eos = plain.sequences[1].tokens[len(ids) + 1]  # a token some beam takes at step 2
    llm.llm_engine.tokenizer.eos_token_id = eos
    try:
        out = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=10))[0]
    finally:
        llm.llm_engine.tokenizer.eos_token_id = 2
    expected, scores = hf_beams(hf_model, ids, 3, 10, 1.0, eos)
    assert any(s[-1] == eos for s in expected)
    assert [s.tokens[len(ids):] for s in out.sequences] == expected
    assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)


def test_beam_width_is_capped_by_max_logprobs(model_path):
    llm = LLM(model=model_path, dtype="float32", max_logprobs=4)
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search(["Hello"], BeamSearchParams(beam_width=3, max_tokens=2))
