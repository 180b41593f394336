"""InternLM 2/2.5 format: ``<|action_start|><|plugin|>{"name": ..., "parameters": {...}}
<|action_end|>`` after optional content. The markers are special tokens, so the request keeps
special tokens in its text."""
from pagedllm.entrypoints.openai.tool_parsers.base import MarkedObjectsToolParser


class InternLMToolParser(MarkedObjectsToolParser):
    start_marker = "<|action_start|><|plugin|>"
    needs_special_tokens = True
