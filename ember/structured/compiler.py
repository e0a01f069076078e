"""Compile a `StructuredOutputs` (or a raw Lark grammar) into the engine's `GrammarSpec`, with a cache.

The cache is per tokenizer and keyed by (kind, canonical spec text, options); it is bounded (LRU) because
schemas come from clients. Errors (invalid schema, unsupported keyword, bad regex, unparsable grammar) raise
`StructuredOutputError` with the engine's message: a request is never run unconstrained instead.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from ember.structured.llguidance_backend import LLGuidanceGrammar, build_matcher, ll_tokenizer
from ember.structured.params import StructuredOutputError, StructuredOutputs
from ember.tokenizer import Tokenizer

CACHE_SIZE = 256

# JSON layout without free whitespace: the separators json.dumps uses, so output reads naturally.
COMPACT_JSON: dict[str, object] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe (the server compiles off the event loop)."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, bool], LLGuidanceGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def eos_token_id(self) -> int:
        eos = self.tokenizer.hf.eos_token_id
        return eos if eos is not None else min(self.tokenizer.eos_token_ids)

    def compile(self, so: StructuredOutputs) -> LLGuidanceGrammar:
        key = so.cache_key()
        kind, text, compact = key
        return self._cached(key, lambda: _to_llguidance(kind, text, compact))

    def compile_lark(self, lark: str) -> LLGuidanceGrammar:
        """A Lark grammar built by ember itself (tool calling); may embed JSON schemas with `%json {...}`."""
        return self._cached(("lark", lark, True), lambda: llguidance.LLMatcher.grammar_from_lark(lark))

    def compile_llguidance(self, grammar: str, description: str) -> LLGuidanceGrammar:
        """A grammar another process compiled (`LLGuidanceGrammar.grammar`), for this process's tokenizer."""
        return self._cached(("llguidance", grammar, False), lambda: grammar, description)

    def _cached(self, key: tuple[str, str, bool], to_grammar: Any,
                description: str | None = None) -> LLGuidanceGrammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        kind, text = key[0], key[1]
        grammar = to_grammar()
        lt = ll_tokenizer(self.tokenizer)
        # Compilation drops the GIL inside llguidance; it runs outside the lock so one slow schema does not
        # stall others (two threads compiling the same key just do the work twice).
        matcher, error = build_matcher(lt, grammar)
        if matcher is None:
            raise StructuredOutputError(kind, error)
        if description is None:
            short = text if len(text) <= 60 else text[:57] + "..."
            description = f"{kind}: {short}"
        spec = LLGuidanceGrammar(matcher, lt, self.eos_token_id, description, grammar)
        with self._lock:
            self.misses += 1
            self._cache[key] = spec
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return spec

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _to_llguidance(kind: str, text: str, compact: bool) -> str:
    """The llguidance grammar (its JSON envelope) for a constraint; errors in the spec's own syntax raise."""
    if kind == "json_object":
        return _json_grammar({"type": "object"}, compact)
    if kind == "json":
        schema = json.loads(text)
        if schema is True:
            schema = {}
        if schema is False:
            raise StructuredOutputError("json", "the schema `false` accepts nothing")
        if not isinstance(schema, dict):
            raise StructuredOutputError("json", f"a JSON schema must be an object, got {type(schema).__name__}")
        return _json_grammar(schema, compact)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(ascii_classes(text))
    if kind == "choice":
        # A Lark alternation of string literals (JSON string syntax is Lark's too).
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(text)))
    if kind == "grammar":
        try:
            lark = any_to_lark(text)  # GBNF (`root ::= ...`) is converted; Lark passes through
        except Exception as e:  # the converter raises its own error types on bad syntax
            raise StructuredOutputError("grammar", f"not a valid Lark or GBNF grammar: {e}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise StructuredOutputError(kind, f"unknown constraint kind {kind!r}")


# llguidance's regexes are Rust's, where \d and \w are Unicode classes (the embedded model, asked for \d{3},
# picks U+1FBF8 "segmented digit eight"). JSON Schema patterns (ECMA-262) and vLLM's regexes mean ASCII, and
# llguidance already reads schema patterns that way; give top-level regexes the same meaning. Rust regex allows
# a class inside a class, so the replacement is valid inside [...] too.
_ASCII = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]"}


def ascii_classes(regex: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            out.append(_ASCII.get(nxt, c + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _json_grammar(schema: dict[str, Any], compact: bool) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON if compact else None)
    except ValueError as e:
        raise StructuredOutputError("json", str(e)) from None


_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, GrammarCompiler] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def get_compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    with _COMPILERS_LOCK:
        c = _COMPILERS.get(tokenizer)
        if c is None:
            c = _COMPILERS[tokenizer] = GrammarCompiler(tokenizer)
        return c


def compile_structured(so: StructuredOutputs, tokenizer: Tokenizer) -> LLGuidanceGrammar:
    """The GrammarSpec for `SamplingParams.structured_output`; raises StructuredOutputError."""
    return get_compiler(tokenizer).compile(so)


def clear_cache() -> None:
    """Forget every compiled grammar (tokenizer conversions are kept). For benchmarks and tests."""
    with _COMPILERS_LOCK:
        compilers = list(_COMPILERS.values())
    for c in compilers:
        c.clear()
