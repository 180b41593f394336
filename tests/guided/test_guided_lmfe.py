"""The lm-format-enforcer backend: engine outputs and its token masks.

Oracles: outputs sampled at temperature 1 from a random tiny model (only the mask keeps it on
track) validate with jsonschema / ``re.fullmatch`` / membership; the bitmask rows, computed
here by walking lmformatenforcer's prefix tree with per-request parsers, equal the allowed
lists of lmformatenforcer's own ``TokenEnforcer`` along random paths.
"""
import json
import pickle
import random
import re

import jsonschema
import pytest
import torch

pytest.importorskip("lmformatenforcer")

from pagedllm import SamplingParams
from pagedllm.guided.params import GuidedDecodingParams
from pagedllm.sample.ops.guided import unpack_bitmask
from tests.guided.cases import ARITH_EBNF, CHOICES, MAX_TOKENS, REGEXES, SCHEMAS

NUM_SAMPLES = 6
VOCAB = 512
# lm-format-enforcer (like vLLM 0.6.3's) does not enforce numeric minimum/maximum and drops
# maxLength under a type list: its schema cases are those with enums, patterns and arrays.
LMFE_SCHEMAS = ["array_enum", "string_pattern"]


def _texts(llm, guided, n=NUM_SAMPLES):
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, guided_decoding=guided)
    outs = llm.generate([f"Sample {i}:" for i in range(n)], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0]
    return [out.outputs[0].text for out in outs]


@pytest.mark.parametrize("name", LMFE_SCHEMAS)
def test_lmfe_json_schema(lmfe_llm, name):
    assert lmfe_llm.llm_engine.config.decoding.guided_decoding_backend == "lm-format-enforcer"
    schema = SCHEMAS[name]
    for text in _texts(lmfe_llm, {"json": schema}):
        jsonschema.validate(json.loads(text), schema)


def test_lmfe_regex_and_choice(lmfe_llm):
    for regex in REGEXES:
        for text in _texts(lmfe_llm, {"regex": regex}):
            assert re.fullmatch(regex, text), text
    for choices in CHOICES:
        for text in _texts(lmfe_llm, {"choice": choices}):
            assert text in choices


def test_lmfe_json_object_and_per_request_backend(lmfe_llm):
    params = SamplingParams(temperature=1.0, max_tokens=60, guided_decoding={"json_object": 1})
    for out in lmfe_llm.generate(["A:", "B:"], params, use_tqdm=False):
        text = out.outputs[0].text
        assert text.lstrip().startswith("{")  # lm-format-enforcer allows leading whitespace
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    pytest.importorskip("outlines_core")
    params = SamplingParams(max_tokens=5, guided_decoding={"regex": "ab", "backend": "outlines"})
    assert lmfe_llm.generate(["x"], params, use_tqdm=False)[0].outputs[0].text == "ab"


@pytest.mark.parametrize("guided, match", [
    ({"grammar": ARITH_EBNF}, "guided_grammar .*lm-format-enforcer.*xgrammar"),
    ({"json": {}, "whitespace_pattern": " ?"}, "whitespace_pattern.*lm-format-enforcer"),
    ({"regex": "a("}, "invalid guided_regex: .*unterminated"),
    ({"json": "{bad"}, "invalid guided_json: .*JSON"),
    ({"json": {"type": "foo"}}, "invalid guided_json: .*foo"),
])
def test_lmfe_invalid_or_unsupported(lmfe_llm, guided, match):
    with pytest.raises(ValueError, match=match):
        lmfe_llm.generate(["x"], SamplingParams(guided_decoding=guided), use_tqdm=False)
    assert not lmfe_llm.llm_engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def compiler(model_path):
    from transformers import AutoTokenizer

    from pagedllm.guided.compiler import GuidedCompiler
    return GuidedCompiler(AutoTokenizer.from_pretrained(model_path), VOCAB, {2},
                          "lm-format-enforcer")


def _allowed(matcher):
    bitmask = torch.zeros(1, VOCAB // 32, dtype=torch.int32)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return set(unpack_bitmask(bitmask, VOCAB)[0].nonzero().flatten().tolist())


FREE_TEXT = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5}, "tags": {"type": "array",
                                                         "items": {"type": "string"}}},
    "required": ["name", "tags"]}


@pytest.mark.parametrize("guided", [
    {"regex": r"[a-z]{2,5}( [0-9]+)?"}, {"choice": ["a-b #x", "C++ (v2)?", "abc"]},
    {"json": SCHEMAS["array_enum"]}, {"json": FREE_TEXT}, {"json_object": True},
], ids=["regex", "choice", "enum", "free_text", "json_object"])
def test_masks_match_token_enforcer(compiler, guided):
    """Along random ASCII paths, each step's row equals TokenEnforcer.get_allowed_tokens on
    the same tokenizer data (stop token included exactly when the text may end)."""
    from lmformatenforcer import TokenEnforcer
    guide = compiler.compile(GuidedDecodingParams(**guided))
    lmfe = guide.grammar
    enforcer = TokenEnforcer(lmfe.tokenizer.data, lmfe.root)
    rng = random.Random(0)
    for _ in range(3):
        matcher, sequence = guide.new_matcher(), []
        for _ in range(40):
            want = set(enforcer.get_allowed_tokens(sequence).allowed_tokens)
            got = _allowed(matcher)
            assert got == want, (sequence, got ^ want)
            ascii_ids = [t for t in sorted(got) if t != 2 and
                         lmfe.tokenizer.token_bytes[t].isascii()]
            if not ascii_ids:
                assert got == {2}
                break
            token = rng.choice(ascii_ids)
            assert matcher.accept_token(token)
            sequence.append(token)


def test_json_strings_exclude_control_characters(compiler):
    """A raw tab may separate JSON tokens but never appear inside a JSON string."""
    tok = compiler.compile(GuidedDecodingParams(json=FREE_TEXT)).grammar.tokenizer
    with_tab = {t for t, raw in tok.token_bytes.items() if b"\t" in raw}
    assert with_tab
    matcher = compiler.compile(GuidedDecodingParams(json=FREE_TEXT)).new_matcher()
    assert with_tab & _allowed(matcher)  # whitespace before the object
    assert matcher.accept_string('{"tags": ["')
    inside = _allowed(matcher)
    assert inside and not with_tab & inside
    assert not any(b < 32 for t in inside for b in tok.token_bytes.get(t, b""))


def test_guide_pickles_and_replays(compiler):
    """The multiprocess executor pickles the compiled guide; a matcher replaying a prefix
    (recompute preemption) reaches the same mask as one that followed it step by step."""
    guide = compiler.compile(GuidedDecodingParams(json=SCHEMAS["string_pattern"]))
    assert compiler.compile(GuidedDecodingParams(json=SCHEMAS["string_pattern"])) is guide
    copy = pickle.loads(pickle.dumps(guide))
    assert copy.grammar.tokenizer is pickle.loads(pickle.dumps(guide)).grammar.tokenizer
    tokenizer = compiler.tokenizer
    ids = tokenizer.encode('{"code": "AB-123", "date": "2024-', add_special_tokens=False)
    a, b = guide.new_matcher(), copy.new_matcher()
    for t in ids:
        assert a.accept_token(t)
    for t in ids:
        b.accept_token(t)
    assert _allowed(a) == _allowed(b)
    texts = {tokenizer.decode([t]) for t in _allowed(a)}
    assert "0" in texts and "1" in texts and all(s[0] in "01" for s in texts)  # [01][0-9]
    assert not a.accept_token(2) and not a.is_terminated()  # EOS before the end: refused
