"""The grammar engine: llguidance (chosen over xgrammar by measurement, see docs/STRUCTURED_OUTPUT.md).

A compiled grammar is an `LLMatcher` in its initial state, kept as a template: each sequence gets a deep copy
(~1 µs), so a request's n sequences and later requests with the same schema skip compilation.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance

from ember.sampling.grammar import GrammarMatcher, GrammarSpec, bitmask_words
from ember.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Converting a tokenizer for llguidance takes ~0.5-1 s: once per tokenizer object.
_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()

# Filling masks for many rows on llguidance's thread pool (GIL released) vs a loop, on 2 shared cores
# (2026-11-28): 8 rows 192 vs 91 µs, 16 rows 279 vs 251 µs, 32 rows 349 vs 461 µs. Break-even ~16 rows here;
# machines with more cores move it lower. The executor is created on first use.
PARALLEL_MIN_ROWS = 16
_executor: llguidance.LLExecutor | None = None


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    with _TOKENIZERS_LOCK:
        lt = _TOKENIZERS.get(tokenizer)
        if lt is None:
            # The HF fast tokenizer serialized to tokenizer.json is what llguidance reads (its `hf.from_tokenizer`
            # does the same, but insists on a class name transformers 5 no longer uses).
            backend = tokenizer.hf.backend_tokenizer
            # The model's end-of-sequence ids may lie outside this tokenizer (a dummy model under a borrowed
            # tokenizer); llguidance rejects those. The engine ends a sequence once its grammar is complete
            # whatever the EOS, so the tokenizer's own ids suffice there.
            eos = sorted(t for t in tokenizer.eos_token_ids if t < tokenizer.vocab_size)
            lt = llguidance.LLTokenizer(byte_level_view(backend.to_str()), n_vocab=tokenizer.vocab_size,
                                        eos_token=eos or None)
            _TOKENIZERS[tokenizer] = lt
        return lt


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_level_view(tokenizer_json: str) -> str:
    """tokenizer.json as llguidance must read it to get each token's bytes right.

    transformers 5.17 converts a byte-level BPE GGUF tokenizer (SmolLM2's) with a decoder chain of ByteFallback,
    Fuse, Replace("▁", " ") and ByteLevel, and byte_fallback on. HF decoding is unaffected (the byte-level
    vocabulary has no <0x..> or ▁ tokens for the first three to act on), but llguidance, seeing ByteFallback,
    reads the vocabulary as SentencePiece's and takes "Ġ" for itself rather than a space: the masks then forbid
    what the grammar allows and allow what it forbids (`{"city":` went on with `:`; transformers 5.25 writes a
    plain ByteLevel decoder). Where the chain holds a ByteLevel decoder and the vocabulary no <0x..> byte
    tokens, the vocabulary is byte-level, and that decoder alone is the right reading.
    """
    spec = json.loads(tokenizer_json)
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "Sequence":
        return tokenizer_json
    byte_level = [d for d in decoder.get("decoders") or [] if d.get("type") == "ByteLevel"]
    vocab = (spec.get("model") or {}).get("vocab")
    if not byte_level or (isinstance(vocab, dict) and any(_BYTE_TOKEN.fullmatch(t) for t in vocab)):
        return tokenizer_json  # not byte-level alone: <0x..> tokens need ByteFallback's reading
    spec["decoder"] = byte_level[0]
    if isinstance(spec.get("model"), dict) and "byte_fallback" in spec["model"]:
        spec["model"]["byte_fallback"] = False
    return json.dumps(spec)


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int, words: int) -> None:
        self.matcher = matcher
        self.eos_token_id = eos_token_id
        self.words = words  # the width llguidance writes (its vocabulary), possibly less than the logits'
        self._error_logged = False

    def fill_bitmask(self, row: torch.Tensor) -> None:
        own = row[: self.words]
        self.matcher.unsafe_compute_mask_ptr(own.data_ptr(), self.words * 4)
        self._guard(row)

    def _guard(self, row: torch.Tensor) -> None:
        # A matcher in an error state allows nothing; an all -inf row would make sampling pick garbage (or NaN
        # under softmax). Allow only end-of-sequence instead, so the sequence ends, and say why.
        if self.matcher.is_error():
            if not self._error_logged:
                logger.error("grammar matcher failed: %s", self.matcher.get_error())
                self._error_logged = True
            row.zero_()
            bit = 1 << (self.eos_token_id % 32)
            row[self.eos_token_id // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 two's complement

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        # Stopped: complete and nothing can follow (also true after an error, which ends the sequence).
        return self.matcher.is_stopped()

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        ms: list[LLGuidanceMatcher] = [m for m in matchers if isinstance(m, LLGuidanceMatcher)]
        words = ms[0].words if ms else 0
        if (len(ms) < PARALLEL_MIN_ROWS or len(ms) != len(matchers) or any(m.words != words for m in ms)
                or bitmask.shape[1] != words or not bitmask.is_contiguous()):
            super().fill_bitmasks(matchers, bitmask)
            return
        global _executor
        if _executor is None:
            _executor = llguidance.LLExecutor()
        # One call, GIL released, rows computed on llguidance's thread pool.
        _executor.unsafe_compute_mask_ptr([(m.matcher, j) for j, m in enumerate(ms)], bitmask.data_ptr(),
                                          words * 4, len(ms))
        for j, m in enumerate(ms):
            m._guard(bitmask[j])


class LLGuidanceGrammar(GrammarSpec):
    """A compiled grammar: validated, ready to hand out matchers."""

    def __init__(self, template: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, eos_token_id: int,
                 description: str, grammar: str) -> None:
        self.template = template
        self.grammar = grammar  # llguidance's grammar text: what another process needs to compile it again
        self.eos_token_id = eos_token_id
        self.words = bitmask_words(tokenizer.vocab_size)
        self.description = description  # kind and a prefix of the spec, for logs and repr

    def new_matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.template.deep_copy(), self.eos_token_id, self.words)

    def __repr__(self) -> str:
        return f"LLGuidanceGrammar({self.description})"


def build_matcher(lt: llguidance.LLTokenizer, grammar: str) -> tuple[llguidance.LLMatcher | None, str]:
    """Validate and build; (matcher, "") or (None, the engine's error message)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lt)
    if is_error:
        return None, "; ".join(messages)
    matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
    if matcher.is_error():
        return None, matcher.get_error()
    return matcher, ""
