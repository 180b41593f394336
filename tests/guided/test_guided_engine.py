"""Guided decoding through ``LLM.generate`` with the xgrammar backend.

Oracle: every output sampled at temperature 1 from a random tiny model (only the mask keeps
it on track) validates: jsonschema for schemas, ``re.fullmatch`` for regexes, membership for
choices, a recursive-descent parser for the arithmetic grammar.
"""
import importlib.util
import json
import re

import jsonschema
import pytest

pytest.importorskip("xgrammar")

from pagedllm import SamplingParams
from pagedllm.guided.params import GuidedDecodingParams
from tests.guided.cases import (ARITH_EBNF, ARITH_LARK, CHOICES, MAX_TOKENS, REGEXES, SCHEMAS,
                                parse_arith)

NUM_SAMPLES = 6


def _texts(llm, guided, n=NUM_SAMPLES, **kw):
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, guided_decoding=guided, **kw)
    outs = llm.generate([f"Sample {i}:" for i in range(n)], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0]
    return [out.outputs[0].text for out in outs]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(guided_llm, name):
    schema = SCHEMAS[name]
    for text in _texts(guided_llm, {"json": schema}):
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_as_text_and_dataclass(guided_llm):
    schema = SCHEMAS["array_enum"]
    guided = GuidedDecodingParams(json=json.dumps(schema))
    for text in _texts(guided_llm, guided, n=3):
        jsonschema.validate(json.loads(text), schema)


def test_json_object(guided_llm):
    params = SamplingParams(temperature=1.0, max_tokens=12,
                            guided_decoding={"json_object": True})
    outs = guided_llm.generate(["A:", "B:", "C:"], params, use_tqdm=False)
    for out in outs:
        text = out.outputs[0].text
        assert text.startswith("{")
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_outputs_fullmatch(guided_llm, regex):
    for text in _texts(guided_llm, {"regex": regex}):
        assert re.fullmatch(regex, text), text


@pytest.mark.parametrize("choices", CHOICES)
def test_choice_outputs_are_members(guided_llm, choices):
    for text in _texts(guided_llm, {"choice": choices}):
        assert text in choices


@pytest.mark.parametrize("grammar", [ARITH_EBNF, ARITH_LARK], ids=["ebnf", "lark"])
def test_grammar_outputs_parse(guided_llm, grammar):
    for text in _texts(guided_llm, {"grammar": grammar}):
        assert parse_arith(text), text


def test_greedy_and_n_and_mixed_batch(guided_llm):
    """Guided and unguided rows share a batch; greedy guided rows obey the mask too."""
    regex = r"[xyz]{4}"
    guided = SamplingParams(temperature=0.0, max_tokens=20, guided_decoding={"regex": regex})
    multi = SamplingParams(temperature=1.0, n=3, max_tokens=20,
                           guided_decoding={"choice": ["up", "down"]})
    plain = SamplingParams(temperature=0.0, max_tokens=8)
    outs = guided_llm.generate(["a", "b", "c"], [guided, multi, plain], use_tqdm=False)
    assert re.fullmatch(regex, outs[0].outputs[0].text)
    assert all(o.text in ("up", "down") for o in outs[1].outputs) and len(outs[1].outputs) == 3
    ref = guided_llm.generate(["c"], plain, use_tqdm=False)[0].outputs[0]
    assert outs[2].outputs[0].token_ids == ref.token_ids


def test_preemption_replays_matcher(model_path):
    """Recompute preemption re-sends a request with its outputs; the runner replays them into
    a fresh matcher, so every output still validates."""
    from pagedllm import LLM
    llm = LLM(model=model_path, block_size=8, num_gpu_blocks_override=12,
              guided_decoding_backend="xgrammar", max_model_len=96)
    schema = SCHEMAS["nested"]
    params = SamplingParams(temperature=1.0, max_tokens=80, guided_decoding={"json": schema})
    outs = llm.generate([f"p{i}" for i in range(8)], params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions_total > 0
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


@pytest.mark.parametrize("guided, match", [
    ({"json": {"type": "foo"}}, "invalid guided_json: .*foo"),
    ({"json": "{bad"}, "invalid guided_json: .*JSON"),
    ({"regex": "a("}, "invalid guided_regex: .*parenthesis"),
    ({"grammar": "root ::= nothing"}, "invalid guided_grammar: .*nothing"),
    ({"grammar": ARITH_EBNF, "backend": "lm-format-enforcer"},
     "guided_grammar .*lm-format-enforcer.*xgrammar"),
    ({"json": {}, "whitespace_pattern": " ?"}, "whitespace_pattern"),
])
def test_invalid_constraints_raise(guided_llm, guided, match):
    with pytest.raises(ValueError, match=match):
        guided_llm.generate(["x"], SamplingParams(guided_decoding=guided), use_tqdm=False)


@pytest.mark.parametrize("value, match", [
    ({"json": {}, "regex": "a"}, "exactly one"),
    ({}, "exactly one"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "backend": "nope"}, "guided_decoding_backend 'nope'"),
    ({"regex": "a", "bogus": 1}, "bogus"),
])
def test_params_validation(value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(guided_decoding=value)


def test_default_backend_is_outlines(outlines_llm):
    """--guided-decoding-backend outlines (the default) on outlines_core; a request may pick
    xgrammar or lm-format-enforcer."""
    llm = outlines_llm
    assert llm.llm_engine.config.decoding.guided_decoding_backend == "outlines"
    params = SamplingParams(max_tokens=5, guided_decoding={"regex": "ab", "backend": "xgrammar"})
    assert llm.generate(["x"], params, use_tqdm=False)[0].outputs[0].text == "ab"
    if importlib.util.find_spec("lmformatenforcer") is not None:
        params = SamplingParams(max_tokens=5, guided_decoding={"regex": "ab",
                                                               "backend": "lm-format-enforcer"})
        assert llm.generate(["x"], params, use_tqdm=False)[0].outputs[0].text == "ab"
    # vLLM 0.6.3's default outlines backend takes (Lark) grammars: here xgrammar compiles them
    for grammar in (ARITH_LARK, ARITH_EBNF):
        params = SamplingParams(max_tokens=MAX_TOKENS, guided_decoding={"grammar": grammar})
        text = llm.generate(["x"], params, use_tqdm=False)[0].outputs[0].text
        assert parse_arith(text), text
    with pytest.raises(ValueError, match="invalid guided_regex"):
        llm.generate(["x"], SamplingParams(guided_decoding={"regex": "a("}), use_tqdm=False)


# outlines_core (like vLLM 0.6.3's outlines) ignores numeric minimum/maximum, and its ``\d``
# is Unicode-wide: its cases use enums, patterns and ASCII classes.
OUTLINES_SCHEMAS = ["array_enum", "string_pattern"]
OUTLINES_REGEXES = [r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"#[0-9a-f]{6}"]


@pytest.mark.parametrize("name", OUTLINES_SCHEMAS)
def test_outlines_json_schema(outlines_llm, name):
    schema = SCHEMAS[name]
    for text in _texts(outlines_llm, {"json": schema}):
        jsonschema.validate(json.loads(text), schema)


def test_outlines_regex_choice_json_object(outlines_llm):
    for regex in OUTLINES_REGEXES:
        for text in _texts(outlines_llm, {"regex": regex}):
            assert re.fullmatch(regex, text), text
    for choices in CHOICES:
        for text in _texts(outlines_llm, {"choice": choices}):
            assert text in choices
    params = SamplingParams(temperature=1.0, max_tokens=12, guided_decoding={"json_object": 1})
    for out in outlines_llm.generate(["A:", "B:"], params, use_tqdm=False):
        assert out.outputs[0].text.startswith("{")
