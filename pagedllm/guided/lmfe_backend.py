"""The ``lm-format-enforcer`` backend (``lmformatenforcer``: character-level parsers).

Constraints become lmformatenforcer parsers, as in vLLM 0.6.3: JSON schemas a
``JsonSchemaParser``, ``json_object`` the parser of ``{"type": "object"}``, regexes a
``RegexParser`` (interegular) and choices a ``UnionParser`` of ``StringParser``s. Grammars
(EBNF/Lark) and ``guided_whitespace_pattern`` have no lmformatenforcer parser and are refused.
Like vLLM's, JSON follows lmformatenforcer's reading of the schema: numeric ``minimum`` /
``maximum`` are not enforced, and whitespace between JSON tokens is free (at most 12 in a row).

Tokenizer data. lmformatenforcer 0.11's ``integrations.transformers`` (where its
``build_token_enforcer_tokenizer_data`` lives) does not import under transformers 5: it imports
``PreTrainedTokenizerBase`` from ``transformers.tokenization_utils``, which transformers 5
removed (only a legacy alias without that name remains). Its builder would also decode every
token twice with the tokenizer. So the ``TokenEnforcerTokenizerData`` is built here from the
raw bytes of every token (the table the outlines backend uses): a token's string is its bytes
decoded as UTF-8 (a fragment of a multi-byte character reads as U+FFFD, as in
lmformatenforcer); tokens with C0 control characters other than tab/newline/CR are left out, and
control characters are kept out of the "any character" alphabet and of the JSON free-text
token list (lmformatenforcer would otherwise let a raw tab into a JSON string, which JSON
forbids).

Matching. lmformatenforcer's own ``TokenEnforcer`` keys its state on the whole token sequence
and returns Python lists of ids; here each request holds just its current parser and an
incremental UTF-8 decoder (``LMFEMatcher``): an accepted token's bytes are decoded and its
characters fed to the parser. The allowed tokens of a parser state are found by walking the
tokenizer's prefix tree (``TokenizerPrefixTree``) along the characters the parser allows, with
the JSON free-text shortcut (one precomputed list for "any string characters, length <= n");
the result is packed into the bitmask row the engine's batched mask op applies, and cached per
compiled guide under the parser's ``cache_key`` (regex / choice states).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import re
import threading

import numpy as np
import torch

logger = logging.getLogger(__name__)

_CONTROL = frozenset(chr(c) for c in range(32))
_ALLOWED_CONTROL = frozenset("\t\n\r")  # tokens may carry these (JSON/regex whitespace)
_MAX_CACHED_ROWS = 4096  # parser states with a cache key, per compiled guide


class LMFETokenizer:
    """lmformatenforcer's tokenizer data plus each token's bytes (for decoding accepted tokens).

    Pickles as its token table; unpickling in another process rebuilds it once per table."""

    def __init__(self, token_bytes: dict[int, bytes], stop_token_ids: tuple[int, ...],
                 vocab_size: int, digest: str | None = None) -> None:
        from lmformatenforcer import TokenEnforcerTokenizerData
        from lmformatenforcer.tokenizerprefixtree import JsonFreetextTokenCache
        self.token_bytes = token_bytes
        self.stop_token_ids = stop_token_ids
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.digest = digest or _digest(token_bytes, stop_token_ids, vocab_size)
        regular = []
        for token_id, raw in sorted(token_bytes.items()):
            text = raw.decode("utf-8", errors="replace")
            if not any(c in _CONTROL and c not in _ALLOWED_CONTROL for c in text):
                regular.append((token_id, text, False))
        data = TokenEnforcerTokenizerData(regular, self._decode, list(stop_token_ids),
                                          False, vocab_size)
        # JSON free text: lmformatenforcer's list would admit raw tabs; rebuild it without any
        # control character (newlines it already leaves out), with its own add/freeze rules.
        freetext = JsonFreetextTokenCache(False, vocab_size)
        for token_id, text, _ in regular:
            if not any(c in _CONTROL for c in text):
                freetext.add_token(text, token_id)
        freetext.freeze()
        data.tokenizer_tree.json_freetext_tokens = freetext
        data.tokenizer_alphabet = "".join(c for c in data.tokenizer_alphabet
                                          if c not in _CONTROL)
        self.data = data
        self.alphabet = frozenset(data.tokenizer_alphabet)
        self._freetext_rows: dict[tuple[int, int], np.ndarray] = {}

    def _decode(self, token_ids: list[int]) -> str:
        return b"".join(self.token_bytes.get(t, b"") for t in token_ids).decode(
            "utf-8", errors="replace")

    def __reduce__(self):
        return (_load_tokenizer, (self.token_bytes, self.stop_token_ids, self.vocab_size,
                                  self.digest))

    def freetext_row(self, min_remaining: int, max_len: int) -> np.ndarray:
        """Packed row (uint32 words) of the JSON free-text tokens for these length bounds."""
        key = (min_remaining, max_len)
        row = self._freetext_rows.get(key)
        if row is None:
            cache = self.data.tokenizer_tree.json_freetext_tokens
            row = self.pack([cache.lookup_allowed_tokens(min_remaining, max_len).allowed_tokens])
            self._freetext_rows[key] = row
        return row

    def pack(self, id_lists: list[list[int]]) -> np.ndarray:
        """Token id lists -> bitmask row (bit j of word w: token 32w + j), uint32 words."""
        allowed = np.zeros(self.num_words * 32, dtype=bool)
        for ids in id_lists:
            if ids:
                allowed[ids] = True
        return np.packbits(allowed, bitorder="little").view("<u4")


_TOKENIZERS: dict[str, LMFETokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _digest(token_bytes: dict[int, bytes], stop_token_ids: tuple[int, ...],
            vocab_size: int) -> str:
    h = hashlib.sha1(repr((vocab_size, stop_token_ids)).encode())
    for token_id, raw in sorted(token_bytes.items()):
        h.update(token_id.to_bytes(4, "little") + len(raw).to_bytes(2, "little") + raw)
    return h.hexdigest()


def _load_tokenizer(token_bytes, stop_token_ids, vocab_size, digest) -> LMFETokenizer:
    with _TOKENIZERS_LOCK:
        tok = _TOKENIZERS.get(digest)
        if tok is None:
            tok = _TOKENIZERS[digest] = LMFETokenizer(token_bytes, stop_token_ids, vocab_size,
                                                      digest)
        return tok


def build_tokenizer(tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> LMFETokenizer:
    """The lmformatenforcer tokenizer data of a Hugging Face tokenizer (special tokens out)."""
    from pagedllm.guided.outlines_backend import token_bytes
    by_id = {token_id: raw
             for raw, ids in token_bytes(tokenizer, vocab_size, set(stop_token_ids)).items()
             for token_id in ids}
    return LMFETokenizer(by_id, stop_token_ids, vocab_size)


def check_supported(params) -> None:
    """``ValueError`` for what lmformatenforcer has no parser for (checked before the
    tokenizer data is built)."""
    if params.kind == "grammar":
        raise ValueError("guided_grammar (an EBNF/Lark grammar) is not supported by the "
                         "lm-format-enforcer backend; use guided_decoding_backend='xgrammar' "
                         "(or 'outlines' for regex/JSON), or --guided-decoding-backend xgrammar")
    if params.whitespace_pattern is not None:
        raise ValueError("guided_whitespace_pattern is not supported by the lm-format-enforcer "
                         "backend; omit it or use guided_decoding_backend='outlines'")


def build_parser(params, config):
    """The lmformatenforcer parser of a constraint (``ValueError`` for what it cannot do);
    ``config``: lmformatenforcer's CharacterLevelParserConfig (imported lazily: optional)."""
    from lmformatenforcer import JsonSchemaParser, RegexParser, StringParser, UnionParser
    check_supported(params)
    kind = params.kind
    if kind == "regex":
        try:
            re.compile(params.regex)  # interegular's syntax errors carry no message
        except re.error as exc:
            raise ValueError(str(exc)) from exc
        try:
            return RegexParser(params.regex, config)
        except Exception as exc:
            raise ValueError(f"lm-format-enforcer's regex engine (interegular) cannot use this "
                             f"regex ({type(exc).__name__}{': ' if str(exc) else ''}{exc})"
                             ) from exc
    if kind == "choice":
        parser = UnionParser([StringParser(c) for c in params.choice])
        parser.config = config
        return parser
    if kind == "json_object":
        return JsonSchemaParser({"type": "object"}, config)
    try:
        schema = json.loads(params.json) if isinstance(params.json, str) else params.json
    except json.JSONDecodeError as exc:
        raise ValueError(f"the schema is not valid JSON ({exc})") from exc
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return JsonSchemaParser(schema, config)


class LMFEGrammar:
    """A compiled constraint: the root parser over one tokenizer, plus the bitmask rows of the
    parser states with a cache key. Shared by every request using the constraint."""

    def __init__(self, tokenizer: LMFETokenizer, params) -> None:
        from lmformatenforcer import CharacterLevelParserConfig
        self.tokenizer = tokenizer
        self.params = params
        config = CharacterLevelParserConfig(alphabet=tokenizer.data.tokenizer_alphabet)
        self.root = build_parser(params, config)
        self._rows: dict = {}
        stop = np.zeros(tokenizer.num_words * 32, dtype=bool)
        stop[list(tokenizer.stop_token_ids)] = True
        self.stop_row = np.packbits(stop, bitorder="little").view("<u4")

    def __reduce__(self):
        return (_load_grammar, (self.tokenizer, self.params))

    def allowed_row(self, parser) -> np.ndarray:
        """The bitmask row (uint32 words) of the tokens allowed after ``parser``'s text, stop
        tokens included when the text may end there; only the stop tokens if the parser fails
        (lmformatenforcer's own choice for a parser error) or allows nothing."""
        key = parser.cache_key()
        if key is not None:
            row = self._rows.get(key)
            if row is not None:
                return row
        try:
            row = self._compute_row(parser)
        except Exception:  # a parser bug must end the request, not the engine
            logger.exception("lm-format-enforcer parser failed on %s; ending the request",
                             self.params.kind)
            row = self.stop_row
        if key is not None and len(self._rows) < _MAX_CACHED_ROWS:
            self._rows[key] = row
        return row

    def _compute_row(self, parser) -> np.ndarray:
        tok = self.tokenizer
        found: list[list[int]] = []
        root = tok.data.tokenizer_tree.root
        shortcut = parser.shortcut_key()
        extra = None
        if isinstance(shortcut, tuple) and shortcut and shortcut[0] == "json_freetext":
            # Inside a free JSON string: every token free of quotes/escapes/control characters
            # that fits the remaining length comes from the precomputed list; only tokens
            # starting with the closing quote need the walk.
            _, cur_len, min_len, max_len = shortcut
            longest = tok.data.tokenizer_tree.json_freetext_tokens.max_token_len
            extra = tok.freetext_row(min(longest, max(0, min_len - cur_len)),
                                     min(longest, max_len - cur_len))
            self._walk(parser, root, found, only='"')
        else:
            self._walk(parser, root, found)
        row = tok.pack(found)
        if extra is not None:
            row = row | extra
        if parser.can_end():
            row = row | self.stop_row
        elif not row.any():
            logger.warning("lm-format-enforcer: no token can continue the %s constraint; "
                           "ending the request", self.params.kind)
            row = self.stop_row
        return row

    def _walk(self, parser, node, found: list[list[int]], only: str | None = None) -> None:
        """Depth-first over the prefix tree, following characters the parser accepts: every
        token ending at a visited node is allowed."""
        found.append(node.tokens)
        allowed = parser.get_allowed_characters() if only is None else only
        children = node.children
        for ch in set(allowed):
            child = children.get(ch)
            if child is not None and (only is None or ch in parser.get_allowed_characters()):
                self._walk(parser.add_character(ch), child, found)


_GRAMMARS: dict[tuple[str, str], LMFEGrammar] = {}


def _load_grammar(tokenizer: LMFETokenizer, params) -> LMFEGrammar:
    """Unpickling in another process: one grammar per (tokenizer, constraint) there too."""
    key = (tokenizer.digest, params.cache_key())
    grammar = _GRAMMARS.get(key)
    if grammar is None:
        grammar = _GRAMMARS[key] = LMFEGrammar(tokenizer, params)
        if len(_GRAMMARS) > 256:
            _GRAMMARS.pop(next(iter(_GRAMMARS)))
    return grammar


class LMFECompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = build_tokenizer(tokenizer, vocab_size, stop_token_ids)

    def compile(self, params) -> LMFEGrammar:
        return LMFEGrammar(self.tokenizer, params)


class LMFEMatcher:
    """xgrammar's ``GrammarMatcher`` interface over an lmformatenforcer parser: the parser of
    the text so far, fed character by character from the accepted tokens' bytes."""

    def __init__(self, grammar: LMFEGrammar, stop_token_ids: tuple[int, ...]) -> None:
        self.grammar = grammar
        self.parser = grammar.root
        self.stop_token_ids = stop_token_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (and the parser is stopped: only EOS follows) if its
        text leaves the constraint's language, or for a stop token before the end."""
        if token_id in self.stop_token_ids:
            self._terminated = self.parser.can_end()
            return self._terminated
        raw = self.grammar.tokenizer.token_bytes.get(token_id)
        if raw is None:
            return self._force_stop()
        parser = self.parser
        try:
            for ch in self._utf8.decode(raw):
                if not self._allows(parser, ch):
                    return self._force_stop()
                parser = parser.add_character(ch)
        except Exception:
            return self._force_stop()
        self.parser = parser
        return True

    def _allows(self, parser, ch: str) -> bool:
        """``ch`` may come next. A character outside the tokenizer's alphabet was assembled
        from byte-fragment tokens, which the prefix tree spells as U+FFFD: it is allowed where
        U+FFFD is (any character)."""
        allowed = parser.get_allowed_characters()
        return ch in allowed or ("\ufffd" in allowed and
                                 ch not in self.grammar.tokenizer.alphabet)

    def _force_stop(self) -> bool:
        from lmformatenforcer.characterlevelparser import ForceStopParser
        self.parser = ForceStopParser()
        return False

    def accept_string(self, text: str) -> bool:
        parser = self.parser
        for ch in text:
            if not self._allows(parser, ch):
                return False
            parser = parser.add_character(ch)
        self.parser = parser
        return True

    def is_terminated(self) -> bool:
        return self._terminated

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        row = self.grammar.allowed_row(self.parser)
        bitmask[index] = torch.from_numpy(row.view(np.int32))
