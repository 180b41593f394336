"""Tool-call parsers of the OpenAI server, by ``--tool-call-parser`` name.

Each format module turns model text into OpenAI ``tool_calls`` (see ``base.ToolParser``);
``forced`` holds the parsers of named and "required" tool choices, whose output is generated
under a JSON schema.
"""
from pagedllm.entrypoints.openai.tool_parsers.base import (ExtractedToolCallInformation,
                                                           ToolParser)
from pagedllm.entrypoints.openai.tool_parsers.forced import (NamedToolParser,
                                                             RequiredToolParser)
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.internlm import InternLMToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "internlm": InternLMToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

__all__ = ["TOOL_PARSERS", "ExtractedToolCallInformation", "ToolParser", "NamedToolParser",
           "RequiredToolParser", "HermesToolParser", "InternLMToolParser",
           "Llama3JsonToolParser", "MistralToolParser"]
