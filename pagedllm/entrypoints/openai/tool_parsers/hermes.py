"""Hermes 2 Pro / Qwen 2.5 format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
one block per call, after optional content."""
from pagedllm.entrypoints.openai.tool_parsers.base import MarkedObjectsToolParser


class HermesToolParser(MarkedObjectsToolParser):
    start_marker = "<tool_call>"
