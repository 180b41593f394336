"""The ``outlines`` backend on ``outlines_core`` (regex -> token index, Rust).

JSON schemas become a regex with outlines' ``build_regex_from_schema`` (whitespace between
tokens: ``whitespace_pattern``, default outlines' ``[ ]?``), choices an alternation of escaped
strings, ``json_object`` the regex of ``{"type": "object"}``. Context-free grammars need a
parser outlines_core does not have: ``guided_grammar`` asks for the xgrammar backend.
The tokenizer's vocabulary is turned into raw bytes once per compiler: byte-level BPE symbols
are mapped back to bytes, SentencePiece ``<0xNN>`` pieces to their byte and ``▁`` to a space.
"""
from __future__ import annotations

import json
import re

import torch

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (unicode symbol -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_bytes(tokenizer, vocab_size: int, skip_ids: set[int]) -> dict[bytes, list[int]]:
    """Raw bytes of every normal token id below ``vocab_size`` (special tokens left out)."""
    byte_decoder = _byte_level_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | skip_ids
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    byte_level = sum(1 for p in pieces if p and all(c in byte_decoder for c in p)) > \
        0.9 * len(pieces)
    out: dict[bytes, list[int]] = {}
    for token_id, piece in enumerate(pieces):
        if piece is None or token_id in special:
            continue
        match = _SPM_BYTE.match(piece)
        if match:
            raw = bytes([int(match.group(1), 16)])
        elif byte_level and all(c in byte_decoder for c in piece):
            raw = bytes(byte_decoder[c] for c in piece)
        else:
            raw = piece.replace("\u2581", " ").encode("utf-8")
        if raw:
            out.setdefault(raw, []).append(token_id)
    return out


class OutlinesCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import outlines_core as oc
        self._oc = oc
        eos = stop_token_ids[0] if stop_token_ids else tokenizer.eos_token_id
        self.vocabulary = oc.Vocabulary(eos, token_bytes(tokenizer, vocab_size,
                                                         set(stop_token_ids)))

    def regex(self, params) -> str:
        from outlines_core.json_schema import build_regex_from_schema
        kind = params.kind
        if kind == "regex":
            return params.regex
        if kind == "choice":
            return "(" + "|".join(re.escape(c) for c in params.choice) + ")"
        if kind == "grammar":
            raise ValueError("guided_grammar (a context-free grammar) is not supported by the "
                             "outlines backend here; use guided_decoding_backend='xgrammar' "
                             "(or --guided-decoding-backend xgrammar)")
        schema = '{"type": "object"}' if kind == "json_object" else (
            params.json if isinstance(params.json, str) else json.dumps(params.json))
        return build_regex_from_schema(schema, params.whitespace_pattern)

    def compile(self, params):
        """The token index of the constraint's regex."""
        return self._oc.Index(self.regex(params), self.vocabulary)


class OutlinesMatcher:
    """xgrammar's ``GrammarMatcher`` interface over an outlines_core ``Guide``."""

    def __init__(self, index, stop_token_ids: tuple[int, ...]) -> None:
        import outlines_core as oc
        self.guide = oc.Guide(index)
        self.stop_token_ids = stop_token_ids
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        if token_id in self.stop_token_ids:
            self._terminated = self.guide.is_finished()
            return self._terminated
        try:
            self.guide.advance(token_id, False)
        except ValueError:
            return False
        return True

    def is_terminated(self) -> bool:
        return self._terminated

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        row = bitmask[index]  # [num_words] int32, contiguous
        self.guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
        if self.guide.is_finished():  # every stop id may end the request, not only the first
            for t in self.stop_token_ids:
                word, bit = divmod(t, 32)
                row[word] |= (1 << bit) if bit < 31 else -(1 << 31)
