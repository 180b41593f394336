"""Mistral format: ``[TOOL_CALLS]`` then a JSON array of ``{"name": ..., "arguments": {...}}``
objects (a single object is accepted too), after optional content.

``[TOOL_CALLS]`` is a special token, so the request keeps special tokens in its text. Call ids
are 9 letters and digits: Mistral's chat templates reject other ids in later turns.
"""
import secrets
import string

from pagedllm.entrypoints.openai.tool_parsers.base import (PartialToolCall, ScanResult,
                                                           ToolParser, content_before_marker)
from pagedllm.entrypoints.openai.tool_parsers.json_scan import (JsonSyntaxError, scan_object,
                                                                skip_ws)

_ID_ALPHABET = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    start_marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def make_call_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def scan(self, text: str, is_final: bool) -> ScanResult:
        content, pos = content_before_marker(text, self.start_marker, is_final)
        result = ScanResult(content=content)
        if pos >= 0:
            result.calls = self._scan_calls(text, skip_ws(text, pos + len(self.start_marker)))
        return result

    def _scan_calls(self, text: str, i: int) -> list[PartialToolCall]:
        """Steps: ``[``, then objects separated by ``,`` up to ``]`` (or one bare object)."""
        if i >= len(text):
            return []
        if text[i] == "{":
            return [self.call_from_object(text, scan_object(text, i))]
        if text[i] != "[":
            raise JsonSyntaxError(f"expected a JSON array of tool calls, got {text[i]!r}")
        calls = []
        i = skip_ws(text, i + 1)
        while i < len(text) and text[i] != "]":
            obj = scan_object(text, i)
            calls.append(self.call_from_object(text, obj))
            if obj.end is None:
                break
            i = skip_ws(text, obj.end)
            if i < len(text) and text[i] == ",":
                i = skip_ws(text, i + 1)
            elif i < len(text) and text[i] != "]":
                raise JsonSyntaxError(f"expected ',' or ']' at {i}, got {text[i]!r}")
        return calls
