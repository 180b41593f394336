"""``GuidedCompiler``: turns a request's ``GuidedDecodingParams`` into a compiled guide, once.

Owned by the engine (front end), which has the tokenizer. ``compile`` resolves the backend
(the request's ``backend``, else ``--guided-decoding-backend``), compiles with that backend's
grammar machinery and caches the result by (backend, constraint); the tokenizer is fixed per
compiler, so the cache key is (constraint, tokenizer). Errors of the parsers (bad schema,
regex or grammar) come back as ``ValueError`` carrying the parser's message, which the server
answers with HTTP 400. The compiled guide rides on ``SamplingParams`` to the runner, which
makes one matcher per request from it (see ``matchers.py``).
"""
from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from typing import Any

from pagedllm.guided.params import IMPLEMENTED_BACKENDS, GuidedDecodingParams

_CPP_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")
_MAX_CACHED = 256



logger = logging.getLogger("pagedllm.guided")

class CompiledGuide:
    """An immutable compiled constraint; shared (never copied) by every request using it."""

    def __init__(self, backend: str, grammar: Any, stop_token_ids: tuple[int, ...]) -> None:
        self.backend = backend
        # xgrammar.CompiledGrammar, outlines_core.Index or lmfe_backend.LMFEGrammar
        self.grammar = grammar
        self.stop_token_ids = stop_token_ids  # the only tokens allowed once terminated

    def __deepcopy__(self, memo: dict) -> "CompiledGuide":
        return self

    def __reduce__(self):
        """Pickling (the multiprocess executor sends new requests to every rank): xgrammar's
        own JSON form of the grammar and of its tokenizer info; outlines' index pickles;
        lm-format-enforcer's guide pickles as its constraint and token table (rebuilt once per
        process)."""
        if self.backend in ("outlines", "lm-format-enforcer"):
            return (CompiledGuide, (self.backend, self.grammar, self.stop_token_ids))
        return (_load_guide, (self.backend, self.grammar.serialize_json(),
                              self.grammar.tokenizer_info.serialize_json(), self.stop_token_ids))

    def new_matcher(self):
        if self.backend == "outlines":
            from pagedllm.guided.outlines_backend import OutlinesMatcher
            return OutlinesMatcher(self.grammar, self.stop_token_ids)
        if self.backend == "lm-format-enforcer":
            from pagedllm.guided.lmfe_backend import LMFEMatcher
            return LMFEMatcher(self.grammar, self.stop_token_ids)
        import xgrammar as xgr
        return xgr.GrammarMatcher(self.grammar)


def _load_guide(backend: str, grammar_json: str, tokenizer_json: str,
                stop_token_ids: tuple[int, ...]) -> CompiledGuide:
    import xgrammar as xgr
    info = xgr.TokenizerInfo.deserialize_json(tokenizer_json)
    return CompiledGuide(backend, xgr.CompiledGrammar.deserialize_json(grammar_json, info),
                         stop_token_ids)


def parser_message(exc: Exception) -> str:
    """The parser's message without xgrammar's '[time] file.cc:line:' prefix."""
    return _CPP_PREFIX.sub("", str(exc).strip())


class GuidedCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int],
                 default_backend: str) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(sorted(eos_token_ids))
        self.default_backend = default_backend
        self._grammar_route_logged = False
        self._xgr_compiler = None
        self._outlines_compiler = None
        self._lmfe_compiler = None
        self._cache: OrderedDict[tuple[str, str], CompiledGuide] = OrderedDict()

    def resolve_backend(self, params: GuidedDecodingParams) -> str:
        backend = params.backend or self.default_backend
        if backend == "outlines" and params.grammar is not None:
            # vLLM 0.6.3's outlines backend takes Lark grammars through outlines' CFG guide,
            # which outlines_core lacks; xgrammar parses the same Lark (and EBNF) grammars
            if not self._grammar_route_logged:
                logger.info("guided_grammar on the outlines backend is compiled by xgrammar "
                            "(outlines_core has no context-free grammars)")
                self._grammar_route_logged = True
            return "xgrammar"
        if backend not in IMPLEMENTED_BACKENDS:
            source = (f"guided_decoding_backend={backend!r} in the request" if params.backend
                      else f"--guided-decoding-backend {backend} (the engine default)")
            raise ValueError(
                f"guided decoding backend {backend!r} ({source}) is not built yet (issue #6); "
                f"working backends: {', '.join(IMPLEMENTED_BACKENDS)}. Start the engine with "
                "--guided-decoding-backend xgrammar (guided_decoding_backend='xgrammar' in "
                "EngineArgs/LLM) or set guided_decoding_backend='xgrammar' per request")
        return backend

    def compile(self, params: GuidedDecodingParams) -> CompiledGuide:
        if self.tokenizer is None:
            raise ValueError("guided decoding needs a tokenizer; it is not available with "
                             "--skip-tokenizer-init")
        backend = self.resolve_backend(params)
        key = (backend, params.cache_key())
        guide = self._cache.get(key)
        if guide is not None:
            self._cache.move_to_end(key)
            return guide
        guide = self.build(params, backend)
        self._cache[key] = guide
        if len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return guide

    def build(self, params: GuidedDecodingParams, backend: str) -> CompiledGuide:
        """Compile without the cache (the bounded compile worker keeps no cache of its own:
        its memory budget is measured from its idle size)."""
        if backend == "outlines":
            compiled = self._compile_outlines(params)
        elif backend == "lm-format-enforcer":
            compiled = self._compile_lmfe(params)
        else:
            compiled = self._compile_xgrammar(params)
        return CompiledGuide(backend, compiled, self.stop_token_ids)

    def _xgrammar(self):
        if self._xgr_compiler is None:
            try:
                import xgrammar as xgr
            except ImportError as exc:
                raise ValueError("the xgrammar guided decoding backend needs the 'xgrammar' "
                                 "package: pip install 'pagedllm[guided]' (or "
                                 "scripts/setup_venv.sh)") from exc
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size,
                stop_token_ids=list(self.stop_token_ids) or None)
            self._xgr_compiler = xgr.GrammarCompiler(info)
        return self._xgr_compiler

    def _compile_outlines(self, params: GuidedDecodingParams):
        if self._outlines_compiler is None:
            try:
                from pagedllm.guided.outlines_backend import OutlinesCompiler
                self._outlines_compiler = OutlinesCompiler(self.tokenizer, self.vocab_size,
                                                           self.stop_token_ids)
            except ImportError as exc:
                raise ValueError("the outlines guided decoding backend needs the "
                                 "'outlines_core' package: pip install 'pagedllm[guided]' (or "
                                 "scripts/setup_venv.sh)") from exc
        try:
            return self._outlines_compiler.compile(params)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"invalid guided_{params.kind}: {exc}") from exc
        except ValueError as exc:
            if str(exc).startswith("guided_grammar"):
                raise
            raise ValueError(f"invalid guided_{params.kind}: {exc}") from exc

    def _compile_lmfe(self, params: GuidedDecodingParams):
        from pagedllm.guided.lmfe_backend import LMFECompiler, check_supported
        check_supported(params)
        if self._lmfe_compiler is None:
            try:
                self._lmfe_compiler = LMFECompiler(self.tokenizer, self.vocab_size,
                                                   self.stop_token_ids)
            except ImportError as exc:
                raise ValueError("the lm-format-enforcer guided decoding backend needs the "
                                 "'lm-format-enforcer' package: pip install 'pagedllm[guided]' "
                                 "(or scripts/setup_venv.sh)") from exc
        try:
            return self._lmfe_compiler.compile(params)
        except ValueError as exc:
            if str(exc).startswith("guided_"):  # not supported by this backend
                raise
            raise ValueError(f"invalid guided_{params.kind}: {exc}") from exc
        except Exception as exc:  # lmformatenforcer's schema errors (plain Exception)
            name = "" if type(exc) is Exception else f"{type(exc).__name__}: "
            raise ValueError(f"invalid guided_{params.kind}: {name}{exc}") from exc

    def _compile_xgrammar(self, params: GuidedDecodingParams):
        compiler = self._xgrammar()
        if params.whitespace_pattern is not None:
            raise ValueError("guided_whitespace_pattern is not supported by the xgrammar "
                             "backend (JSON is generated without free whitespace); omit it "
                             "or use guided_decoding_backend='outlines'")
        kind = params.kind
        try:
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                return compiler.compile_grammar(json_schema_grammar(schema))
            if kind == "json_object":
                return compiler.compile_grammar(json_schema_grammar('{"type": "object"}'))
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return _compile_grammar_text(compiler, params.grammar)
        except RuntimeError as exc:
            raise ValueError(f"invalid guided_{kind}: {parser_message(exc)}") from exc


def json_schema_grammar(schema: str) -> str:
    """EBNF of a JSON schema (compact separators, as outlines' default whitespace ``[ ]?``
    without the optional space). xgrammar 0.2's class for characters of length-bounded strings
    lets raw control characters through, which JSON forbids; they are excluded here."""
    import xgrammar as xgr
    text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'


def choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose language is exactly the given strings."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _compile_grammar_text(compiler, text: str):
    """EBNF (GBNF, ``rule ::= ...``) or, without ``::=``, a Lark grammar (vLLM 0.6.3 form)."""
    if "::=" in text:
        return compiler.compile_grammar(text)
    return compiler.compile_lark(text)
