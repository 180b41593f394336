"""Tool-calling checks that need no running engine: start-up flags, the "auto" 400 without a
parser, request validation, and tools reaching the chat template."""
import argparse
import asyncio

import pytest
from pydantic import ValidationError

from pagedllm import cli
from pagedllm.entrypoints.openai.cli_args import make_arg_parser, server_config_from_args
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_engine import OpenAIError, ServingContext
from tests.utils.tiny_models import build_tiny_model

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
MESSAGES = [{"role": "user", "content": "hi"}]


def _parse(argv):
    return make_arg_parser(argparse.ArgumentParser(exit_on_error=False)).parse_args(argv)


def test_server_flags():
    config = server_config_from_args(_parse(["--enable-auto-tool-choice",
                                             "--tool-call-parser", "mistral"]))
    assert config.enable_auto_tool_choice and config.tool_call_parser == "mistral"
    with pytest.raises(ValueError, match="requires --tool-call-parser"):
        server_config_from_args(_parse(["--enable-auto-tool-choice"]))
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parse(["--tool-call-parser", "nope"])


def test_serve_refuses_bad_tool_flags(capsys):
    assert cli.main(["serve", "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--tool-call-parser", "nope"])
    err = capsys.readouterr().err
    assert "hermes" in err and "llama3_json" in err and "internlm" in err


def test_request_tool_choice_defaults_and_schemas():
    assert ChatCompletionRequest(model="m", messages=MESSAGES).tool_choice == "none"
    request = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL])
    assert request.tool_choice == "auto" and request.tool_call_schema() is None
    named = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "get_weather"}})
    assert named.tool_call_schema() == TOOL["function"]["parameters"]
    assert named.to_sampling_params(16).guided_decoding.json == TOOL["function"]["parameters"]
    required = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL],
                                     tool_choice="required", parallel_tool_calls=False)
    schema = required.tool_call_schema()
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"] == {
        "type": "string", "enum": ["get_weather"]}
    for bad in ({"tool_choice": "auto"}, {"tools": [], "tool_choice": "none"},
                {"tools": [TOOL], "tool_choice": {"type": "function",
                                                  "function": {"name": "x"}}}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="m", messages=MESSAGES, **bad)


@pytest.fixture(scope="module")
def chat():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("llama"))
    ctx = ServingContext(engine=None, tokenizer=tokenizer, served_model_names=["m"],
                         max_model_len=64, max_logprobs=5)
    return OpenAIServingChat(ctx)


def test_auto_needs_the_server_flags(chat):
    request = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL])
    with pytest.raises(OpenAIError, match='"auto" tool choice requires '
                                          "--enable-auto-tool-choice and --tool-call-parser"):
        asyncio.run(chat.create_chat_completion(request, None))


def test_tools_and_tool_calls_reach_the_chat_template(chat):
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}"
                "{% else %}{{ m.content }}{% endif %};{% endfor %}")
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = chat.apply_chat_template(messages, add_generation_prompt=False,
                                      chat_template=template, tools=[TOOL])
    assert prompt == "[get_weather]user:hi;assistant:Oslo;tool:sunny;"


@pytest.mark.parametrize("parser, skips", [("hermes", True), ("llama3_json", True),
                                           ("mistral", False), ("internlm", False)])
def test_special_token_markers_stay_in_the_text(chat, parser, skips):
    ctx = ServingContext(engine=None, tokenizer=chat.tokenizer, served_model_names=["m"],
                         max_model_len=64, max_logprobs=5, enable_auto_tools=True,
                         tool_parser=parser)
    request = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL])
    checked = OpenAIServingChat(ctx)._check_tool_choice(request)
    assert checked.skip_special_tokens is skips
    assert checked.to_sampling_params(16).skip_special_tokens is skips
