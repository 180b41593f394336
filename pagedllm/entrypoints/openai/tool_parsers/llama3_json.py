"""Llama 3.1/3.2 JSON format: optional ``<|python_tag|>``, then one or more
``{"name": ..., "parameters": {...}}`` objects separated by ``;``. The whole output is the
tool calls (no content); an output that does not start with the tag or ``{`` is plain text.
"""
from pagedllm.entrypoints.openai.tool_parsers.base import ScanResult, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.json_scan import (JsonSyntaxError, scan_object,
                                                                skip_ws)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def scan(self, text: str, is_final: bool) -> ScanResult:
        i = skip_ws(text, 0)
        rest = text[i:]
        if rest.startswith(PYTHON_TAG):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif not rest.startswith("{"):
            undecided = not is_final and PYTHON_TAG.startswith(rest)  # rest may be ""
            return ScanResult(content="" if undecided else text)
        result = ScanResult(content="")
        while i < len(text):
            obj = scan_object(text, i)
            result.calls.append(self.call_from_object(text, obj))
            if obj.end is None:
                break
            i = skip_ws(text, obj.end)
            if i < len(text):
                if text[i] != ";":
                    raise JsonSyntaxError(f"expected ';' between tool calls at {i}")
                i = skip_ws(text, i + 1)
        return result
