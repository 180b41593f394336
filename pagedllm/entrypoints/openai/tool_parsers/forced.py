"""Parsers of outputs generated under a forced tool choice (guided JSON, see
``ChatCompletionRequest.tool_call_schema``): the model did not choose to call, so the
finish_reason stays the engine's ("stop"), as OpenAI and vLLM answer.

* named tool: the whole output is the arguments of that one function;
* "required": the output is ``[{"name": ..., "parameters": {...}}, ...]``.
"""
from typing import Optional

from pagedllm.entrypoints.openai.protocol import FunctionCall, ToolCall
from pagedllm.entrypoints.openai.tool_parsers.base import (ExtractedToolCallInformation,
                                                           PartialToolCall, ScanResult,
                                                           ToolParser)
from pagedllm.entrypoints.openai.tool_parsers.mistral import MistralToolParser


class NamedToolParser(ToolParser):
    reports_tool_calls_finish = False

    def __init__(self, function_name: str, max_calls: Optional[int] = None) -> None:
        super().__init__(max_calls)
        self.function_name = function_name

    def scan(self, text: str, is_final: bool) -> ScanResult:
        return ScanResult(content="", calls=[PartialToolCall(
            name=self.function_name, arguments=text, is_complete=is_final)])

    def extract_tool_calls(self, text: str) -> ExtractedToolCallInformation:
        """The one call, its arguments exactly the generated text (even if a length limit cut
        it short: the finish_reason says so)."""
        call = ToolCall(id=self.make_call_id(),
                        function=FunctionCall(name=self.function_name, arguments=text))
        return ExtractedToolCallInformation(tools_called=True, tool_calls=[call], content=None)


class RequiredToolParser(MistralToolParser):
    start_marker = ""
    argument_keys = ("parameters",)
    needs_special_tokens = False
    reports_tool_calls_finish = False

    def make_call_id(self) -> str:
        return ToolParser.make_call_id(self)
