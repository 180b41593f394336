"""Tool parsers on canned model outputs of each format, whole and streamed in small chunks.

Oracle: the calls written into the canned text. Streamed, the content deltas concatenate to
the non-streaming content, each call's first delta carries id/type/name and its argument
fragments concatenate to JSON equal to the non-streaming arguments; malformed tool-call text
comes back as plain content both ways.
"""
import json

import pytest

from pagedllm.entrypoints.openai.cli_args import TOOL_PARSER_NAMES
from pagedllm.entrypoints.openai.tool_parsers import (TOOL_PARSERS, NamedToolParser,
                                                      RequiredToolParser)

WEATHER = {"city": "Paris", "unit": "c"}
TRICKY = {"x": [1, 2.5e3, {"y": "}{][,:"}], "t": True, "n": None,
          "s": "東京 \"quoted\" \\ back\nslash"}

# (parser, text, content, [(name, arguments)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>'
     % json.dumps(WEATHER), None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check both.\n<tool_call>\n{"name": "a", "arguments": %s}\n</tool_call>\n'
     '<tool_call>\n{"arguments": {}, "name": "b"}\n</tool_call>' % json.dumps(TRICKY,
                                                                            ensure_ascii=False),
     "Let me check both.\n", [("a", TRICKY), ("b", {})]),
    ("hermes", '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>', None,
     [("s", {"q": 1})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": %s}'
     % json.dumps(WEATHER), None, [("get_weather", WEATHER)]),
    ("llama3_json", ' {"name": "a", "parameters": %s}; {"type": "function", "name": "b", '
     '"arguments": {"k": -1}}' % json.dumps(TRICKY), None, [("a", TRICKY), ("b", {"k": -1})]),
    ("llama3_json", '{"name": "noargs"}', None, [("noargs", {})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": %s}, {"name": "b", '
     '"arguments": {"k": [1]}}]' % json.dumps(WEATHER), None,
     [("get_weather", WEATHER), ("b", {"k": [1]})]),
    ("mistral", 'Sure.[TOOL_CALLS]{"name": "a", "arguments": %s}' % json.dumps(TRICKY),
     "Sure.", [("a", TRICKY)]),
    ("internlm", 'I will search.<|action_start|><|plugin|>\n{"name": "search", "parameters": '
     '{"q": "pagedllm"}}<|action_end|>', "I will search.", [("search", {"q": "pagedllm"})]),
]

MALFORMED = [
    ("hermes", "Just an answer, with <b>html</b> and < signs."),
    ("hermes", "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>'),  # no name
    ("hermes", 'ends with a partial marker <tool_ca'),
    ("llama3_json", '{"answer": 42}'),
    ("llama3_json", 'Hello {"name": "a", "parameters": {}}'),
    ("llama3_json", "<|python_ta"),
    ("mistral", "[TOOL_CALLS] oops"),
    ("internlm", '<|action_start|><|plugin|>{"name": 5, "parameters": {}}<|action_end|>'),
    ("internlm", "<|action_start|><|interpreter|>print(1)<|action_end|>"),
]
# Broken only after a complete call: the whole text is content, but a stream has sent that
# call by the time the text breaks, and then sends nothing more.
BROKEN_LATE = [
    ("llama3_json", '{"name": "a", "parameters": {}} and some words'),
    ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {}} {"name": "b"}]'),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": 1}'),
]


def stream(parser, text, size):
    """Feed ``text`` in ``size``-character chunks; return (content, {index: call}, deltas)."""
    deltas, previous = [], ""
    for end in range(size, len(text) + size, size):
        current = text[:end]
        delta = parser.extract_tool_calls_streaming(previous, current, current[len(previous):])
        previous = current
        if delta is not None:
            deltas.append(delta)
    last = parser.finish_streaming(text)
    if last is not None:
        deltas.append(last)
    content, calls = None, {}
    for delta in deltas:
        if delta.content is not None:
            content = (content or "") + delta.content
        for piece in delta.tool_calls:
            if piece.index not in calls:
                assert piece.id and piece.type == "function" and piece.function.name, piece
                calls[piece.index] = {"id": piece.id, "name": piece.function.name,
                                      "arguments": piece.function.arguments or ""}
            else:
                assert piece.id is None and piece.function.name is None, piece
                calls[piece.index]["arguments"] += piece.function.arguments
    return content, calls


def test_registry_matches_cli_choices():
    assert tuple(sorted(TOOL_PARSERS)) == TOOL_PARSER_NAMES


@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_extract_whole(name, text, content, expected):
    info = TOOL_PARSERS[name]().extract_tool_calls(text)
    assert info.tools_called and info.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] \
        == expected
    assert all(c.type == "function" for c in info.tool_calls)
    assert len({c.id for c in info.tool_calls}) == len(expected)
    if name == "mistral":  # Mistral templates need 9-character alphanumeric ids
        assert all(len(c.id) == 9 and c.id.isalnum() for c in info.tool_calls)
    else:
        assert all(c.id.startswith("chatcmpl-tool-") for c in info.tool_calls)


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_extract_streaming(name, text, content, expected, size):
    parser = TOOL_PARSERS[name]()
    streamed_content, calls = stream(parser, text, size)
    assert parser.tools_called
    assert (streamed_content or None) == content
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] \
        == expected
    assert sorted(calls) == list(range(len(expected)))


@pytest.mark.parametrize("name, text", MALFORMED)
def test_malformed_is_plain_content(name, text):
    info = TOOL_PARSERS[name]().extract_tool_calls(text)
    assert not info.tools_called and info.tool_calls == [] and info.content == text
    for size in (1, 4):
        parser = TOOL_PARSERS[name]()
        content, calls = stream(parser, text, size)
        assert content == text and calls == {} and not parser.tools_called


@pytest.mark.parametrize("name, text", BROKEN_LATE)
def test_broken_after_a_call(name, text):
    info = TOOL_PARSERS[name]().extract_tool_calls(text)
    assert not info.tools_called and info.content == text
    content, calls = stream(TOOL_PARSERS[name](), text, 2)
    assert content is None and [(c["name"], c["arguments"]) for c in calls.values()] \
        == [("a", "{}")]


def test_streaming_holds_back_a_marker_until_it_is_decided():
    parser = TOOL_PARSERS["hermes"]()
    assert parser.extract_tool_calls_streaming("", "Hi <tool", "Hi <tool").content == "Hi "
    delta = parser.extract_tool_calls_streaming("Hi <tool", "Hi <tool_call>{", "_call>{")
    assert delta is None  # inside the call, before its name
    delta = parser.extract_tool_calls_streaming("", 'Hi <tool_call>{"name": "f"',
                                                ' "name": "f"')
    assert delta.tool_calls[0].function.name == "f" and delta.content is None


def test_at_most_one_call_without_parallel_tool_calls():
    text = CASES[6][1]  # mistral, two calls
    info = TOOL_PARSERS["mistral"](max_calls=1).extract_tool_calls(text)
    assert [c.function.name for c in info.tool_calls] == ["get_weather"]
    _, calls = stream(TOOL_PARSERS["mistral"](max_calls=1), text, 2)
    assert list(calls) == [0] and json.loads(calls[0]["arguments"]) == WEATHER


def test_forced_parsers():
    args = json.dumps(TRICKY)
    info = NamedToolParser("f").extract_tool_calls(args)
    assert info.tool_calls[0].function.name == "f" and info.tool_calls[0].function.arguments \
        == args and info.content is None
    parser = NamedToolParser("f")
    content, calls = stream(parser, args, 5)
    assert content is None and calls[0]["name"] == "f" and calls[0]["arguments"] == args
    assert not parser.reports_tool_calls_finish
    text = json.dumps([{"name": "a", "parameters": TRICKY}, {"name": "b", "parameters": {}}])
    info = RequiredToolParser().extract_tool_calls(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] \
        == [("a", TRICKY), ("b", {})]
    _, calls = stream(RequiredToolParser(), text, 3)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] \
        == [("a", TRICKY), ("b", {})]
