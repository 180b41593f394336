"""Incremental detokenization and stop strings, one instance per request.

Text is produced by decoding a short window of ids: ``decode(ids[prefix:])`` minus
``decode(ids[prefix:read])``. The window starts with a few prompt tokens so leading spaces of
the first output token come out as a full decode would give them; a trailing U+FFFD (an
unfinished multi-byte character) holds the text back until the next token completes it.
"""
from __future__ import annotations

from pagedllm.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.enabled = tokenizer is not None and params.detokenize
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self.output_text = ""
        assert params.stop is not None  # a list since SamplingParams' init
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens)

    def update(self, token_id: int) -> int:
        """Add one output token; return how many characters of text it added."""
        if not self.enabled:
            return 0
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return 0
        delta = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self.output_text += delta
        return len(delta)

    def find_stop_string(self, num_new_chars: int) -> str | None:
        """Look for a stop string ending in the new text; truncate the text and return it."""
        if not self.params.stop or num_new_chars == 0:
            return None
        text = self.output_text
        start = max(0, len(text) - num_new_chars - self._max_stop_len + 1)
        found: tuple[int, str] | None = None
        for stop in self.params.stop:
            idx = text.find(stop, start)
            if idx != -1 and (found is None or idx < found[0]):
                found = (idx, stop)
        if found is None:
            return None
        idx, stop = found
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.output_text = text[:end]
        return stop

    def drop_last(self, num_chars: int) -> None:
        """Remove the text of the last token (a stop token is not shown unless asked)."""
        if num_chars and not self.params.include_stop_str_in_output:
            self.output_text = self.output_text[:-num_chars]
