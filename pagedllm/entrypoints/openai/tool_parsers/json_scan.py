"""Incremental scanning of JSON text that may still be growing (a streamed model output).

The scanners find where values begin and end without decoding them, so a tool parser can
stream the raw text of a call's ``arguments`` value as it arrives. Each returns ``None`` for
"the text ends before this value does" and raises ``JsonSyntaxError`` when the text can no
longer become valid JSON at this level. Containers are matched by brackets and strings only;
the complete text is decoded with ``json.loads`` by the caller, which does the full check.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

_WHITESPACE = " \t\r\n"
_SCALAR_CHARS = frozenset("0123456789+-.eEtruefalsn")
_CLOSING = {"{": "}", "[": "]"}
_STRING_BODY = re.compile(r'(?:[^"\\]|\\.)*', re.DOTALL)  # up to the closing quote
_PLAIN_RUN = re.compile(r'[^"{}\[\]]*')


class JsonSyntaxError(ValueError):
    """The text cannot be (the beginning of) the expected JSON."""


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def scan_string(text: str, pos: int) -> Optional[int]:
    """End (exclusive) of the JSON string whose opening quote is ``text[pos]``."""
    end = _STRING_BODY.match(text, pos + 1).end()
    return end + 1 if end < len(text) and text[end] == '"' else None


def _scan_container(text: str, pos: int) -> Optional[int]:
    stack = [_CLOSING[text[pos]]]
    i = pos + 1
    while True:
        i = _PLAIN_RUN.match(text, i).end()  # jump to the next quote or bracket
        if i >= len(text):
            return None
        ch = text[i]
        if ch == '"':
            end = scan_string(text, i)
            if end is None:
                return None
            i = end
            continue
        if ch in _CLOSING:
            stack.append(_CLOSING[ch])
        elif ch in "}]":
            if ch != stack.pop():
                raise JsonSyntaxError(f"mismatched {ch!r} at {i}")
            if not stack:
                return i + 1
        i += 1


def scan_value(text: str, pos: int) -> Optional[int]:
    """End (exclusive) of the JSON value starting at ``text[pos]`` (no leading whitespace)."""
    ch = text[pos]
    if ch == '"':
        return scan_string(text, pos)
    if ch in _CLOSING:
        return _scan_container(text, pos)
    end = pos
    while end < len(text) and text[end] in _SCALAR_CHARS:
        end += 1
    if end == pos:
        raise JsonSyntaxError(f"unexpected {ch!r} at {pos}")
    if end == len(text):
        return None  # a number or literal that may go on
    try:
        json.loads(text[pos:end])
    except ValueError as exc:
        raise JsonSyntaxError(f"bad literal {text[pos:end]!r}") from exc
    return end


@dataclass
class ObjectScan:
    """A JSON object seen so far: each key's value span ``(start, end or None)``."""
    start: int
    fields: dict[str, tuple[int, Optional[int]]] = field(default_factory=dict)
    end: Optional[int] = None  # None while the object is not closed yet


def scan_object(text: str, pos: int) -> ObjectScan:
    """Scan the object whose ``{`` is ``text[pos]``, as far as the text goes.

    Steps: ``{``, then per member: key string, ``:``, value, then ``,`` or ``}``. Stops
    (``end`` None) where the text runs out; a value still growing is recorded with end None.
    """
    if text[pos] != "{":
        raise JsonSyntaxError(f"expected '{{' at {pos}, got {text[pos]!r}")
    scan = ObjectScan(start=pos)
    i = skip_ws(text, pos + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return scan
    while i < len(text):
        if text[i] != '"':
            raise JsonSyntaxError(f"expected a key at {i}, got {text[i]!r}")
        key_end = scan_string(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            raise JsonSyntaxError(f"expected ':' at {i}, got {text[i]!r}")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return scan
        value_end = scan_value(text, i)
        scan.fields.setdefault(key, (i, value_end))
        if value_end is None:
            return scan
        i = skip_ws(text, value_end)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            raise JsonSyntaxError(f"expected ',' or '}}' at {i}, got {text[i]!r}")
        i = skip_ws(text, i + 1)
    return scan


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``: text a
    stream must hold back because the next token may complete the marker."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
