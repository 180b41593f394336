"""``ToolParser``: turns a model's text into OpenAI tool calls, whole or while it streams.

A format module implements one method, ``scan(text, is_final)``: the content the text shows
before its tool calls, and each call seen so far (``PartialToolCall``: the name once its JSON
string is complete, the raw text of the arguments value as far as it goes). Everything else
is shared:

* ``extract_tool_calls(text)`` scans the finished text; every call must be a complete JSON
  object with a string ``name`` and an object (or JSON-string) ``arguments``/``parameters``,
  else the whole text is plain content (no tool calls).
* ``extract_tool_calls_streaming(previous_text, current_text, delta_text)`` rescans the text
  so far and returns what is new as a ``DeltaMessage``: content, then per call a first delta
  with index, id, type and function name, later deltas with argument fragments. The
  fragments of one call concatenate to the raw arguments text, which decodes to the same
  JSON as the non-streaming ``arguments``.
* ``finish_streaming(text)`` flushes what the stream held back (the start of a marker that
  never completed). A stream that ends without having sent a tool call, or whose tool-call
  text turned out malformed before any call was sent, gives back all its text as content.

Parser instances hold the streaming state of one choice of one request: make one per choice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from pagedllm.entrypoints.openai.protocol import (DeltaFunctionCall, DeltaMessage,
                                                  DeltaToolCall, FunctionCall, ToolCall,
                                                  random_uuid)
from pagedllm.entrypoints.openai.tool_parsers.json_scan import (JsonSyntaxError, ObjectScan,
                                                                partial_marker_len, scan_object,
                                                                skip_ws)


@dataclass
class PartialToolCall:
    name: Optional[str] = None   # None until the name's JSON string is complete
    arguments: str = ""          # raw arguments text seen so far
    is_complete: bool = False    # the call's JSON has ended
    raw: Optional[str] = None    # the call's complete JSON object text, once it has ended


@dataclass
class ScanResult:
    content: str                 # text before the tool calls (safe to stream)
    calls: list[PartialToolCall] = field(default_factory=list)


@dataclass
class ExtractedToolCallInformation:
    tools_called: bool
    tool_calls: list[ToolCall]
    content: Optional[str] = None


@dataclass
class _SentCall:
    id: str
    num_argument_chars: int = 0


class ToolParser:
    """Base of every format; subclasses set the class attributes and implement ``scan``."""
    # Keys of a call object; the first argument key present wins.
    name_key = "name"
    argument_keys: tuple[str, ...] = ("arguments", "parameters")
    # The format's markers are special tokens: the request must not skip them in the text.
    needs_special_tokens = False
    # finish_reason "tool_calls" when calls were made (the model chose to call: "auto").
    reports_tool_calls_finish = True

    def __init__(self, max_calls: Optional[int] = None) -> None:
        self.max_calls = max_calls  # 1 with parallel_tool_calls=false
        self._sent_content = 0
        self._sent_calls: list[_SentCall] = []
        self._is_plain = False

    # ---- format ------------------------------------------------------------------------
    def scan(self, text: str, is_final: bool) -> ScanResult:
        """Content and calls of ``text``; while streaming (not final) the content excludes a
        possible unfinished marker. Raises ``JsonSyntaxError`` on malformed tool-call text."""
        raise NotImplementedError

    def make_call_id(self) -> str:
        return f"chatcmpl-tool-{random_uuid()}"

    def call_from_object(self, text: str, obj: ObjectScan) -> PartialToolCall:
        """The call a (possibly unfinished) JSON object describes."""
        call = PartialToolCall(is_complete=obj.end is not None)
        start, end = obj.fields.get(self.name_key, (0, None))
        if end is not None:
            name = json.loads(text[start:end])
            if not isinstance(name, str):
                raise JsonSyntaxError(f"{self.name_key!r} must be a string")
            call.name = name
        key = next((k for k in self.argument_keys if k in obj.fields), None)
        if key is not None:
            start, end = obj.fields[key]
            if text[start] == '"':  # arguments given as a JSON string: send it decoded
                call.arguments = json.loads(text[start:end]) if end is not None else ""
            else:
                call.arguments = text[start:end] if end is not None else text[start:]
        elif call.is_complete:
            call.arguments = "{}"
        if call.is_complete:
            call.raw = text[obj.start:obj.end]
        return call

    # ---- whole text --------------------------------------------------------------------
    def extract_tool_calls(self, text: str) -> ExtractedToolCallInformation:
        plain = ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=text)
        try:
            scan = self.scan(text, is_final=True)
            calls = [self._tool_call(call) for call in scan.calls]
        except ValueError:  # JsonSyntaxError and json.JSONDecodeError
            return plain
        if not calls:
            return plain
        content = scan.content if scan.content.strip() else None
        return ExtractedToolCallInformation(tools_called=True,
                                            tool_calls=calls[:self.max_calls], content=content)

    def _tool_call(self, call: PartialToolCall) -> ToolCall:
        if not call.is_complete or call.raw is None:
            raise JsonSyntaxError("unfinished tool call")
        obj = json.loads(call.raw)
        name = obj.get(self.name_key)
        args = next((obj[k] for k in self.argument_keys if k in obj), {})
        if not isinstance(name, str) or not isinstance(args, (dict, str)):
            raise JsonSyntaxError(f"a tool call needs a string {self.name_key!r} and object "
                                  "arguments")
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCall(id=self.make_call_id(), function=FunctionCall(name=name,
                                                                      arguments=arguments))

    # ---- streaming ---------------------------------------------------------------------
    @property
    def tools_called(self) -> bool:
        """Whether the stream has sent a tool call."""
        return bool(self._sent_calls)

    def extract_tool_calls_streaming(self, previous_text: str, current_text: str,
                                     delta_text: str) -> Optional[DeltaMessage]:
        """What ``current_text`` adds to the stream (None: nothing to send yet)."""
        return self._advance(current_text, is_final=False)

    def finish_streaming(self, current_text: str) -> Optional[DeltaMessage]:
        """The last delta of a finished stream: text held back so far."""
        return self._advance(current_text, is_final=True)

    def _advance(self, text: str, is_final: bool) -> Optional[DeltaMessage]:
        if self._is_plain:
            return self._content_delta(text)
        try:
            scan = self.scan(text, is_final)
        except ValueError:
            scan = None
        if scan is None or (is_final and not self._sent_calls and not self._has_named(scan)):
            if self._sent_calls:  # malformed after calls went out: send nothing more
                return None
            self._is_plain = True
            return self._content_delta(text)
        content = None
        if len(scan.content) > self._sent_content:
            content = scan.content[self._sent_content:]
            self._sent_content = len(scan.content)
        deltas = self._call_deltas(scan.calls)
        if content is None and not deltas:
            return None
        message = DeltaMessage(tool_calls=deltas) if deltas else DeltaMessage()
        if content is not None:
            message.content = content
        return message

    def _has_named(self, scan: ScanResult) -> bool:
        return any(call.name is not None for call in scan.calls[:self.max_calls])

    def _content_delta(self, text: str) -> Optional[DeltaMessage]:
        if len(text) <= self._sent_content:
            return None
        delta = text[self._sent_content:]
        self._sent_content = len(text)
        return DeltaMessage(content=delta)

    def _call_deltas(self, calls: list[PartialToolCall]) -> list[DeltaToolCall]:
        deltas = []
        for index, call in enumerate(calls[:self.max_calls]):
            if call.name is None:
                break  # calls are sent in order: a later one waits for this name
            is_new = index == len(self._sent_calls)
            if is_new:
                self._sent_calls.append(_SentCall(id=self.make_call_id()))
            sent = self._sent_calls[index]
            fragment = call.arguments[sent.num_argument_chars:]
            sent.num_argument_chars = max(sent.num_argument_chars, len(call.arguments))
            if is_new:
                deltas.append(DeltaToolCall(
                    index=index, id=sent.id, type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=fragment)))
            elif fragment:
                deltas.append(DeltaToolCall(index=index,
                                            function=DeltaFunctionCall(arguments=fragment)))
        return deltas


def content_before_marker(text: str, marker: str, is_final: bool) -> tuple[str, int]:
    """``(content, marker position or -1)``; while streaming, a possible unfinished marker at
    the end is held back from the content."""
    start = text.find(marker)
    if start >= 0:
        return text[:start], start
    keep = len(text) if is_final else len(text) - partial_marker_len(text, marker)
    return text[:keep], -1


class MarkedObjectsToolParser(ToolParser):
    """Formats where each call is ``<start marker> {json object}`` (an end marker, if any,
    follows the object and is not checked). Text after the first call is not content."""
    start_marker = ""

    def scan(self, text: str, is_final: bool) -> ScanResult:
        content, pos = content_before_marker(text, self.start_marker, is_final)
        result = ScanResult(content=content)
        while pos >= 0:
            i = skip_ws(text, pos + len(self.start_marker))
            if i >= len(text):
                break
            obj = scan_object(text, i)
            result.calls.append(self.call_from_object(text, obj))
            if obj.end is None:
                break
            pos = text.find(self.start_marker, obj.end)
        return result
