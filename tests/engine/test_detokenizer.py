"""Incremental detokenization: multi-byte characters split across tokens, stop strings split across tokens."""

from __future__ import annotations

import pytest

from ember.engine.detokenizer import Detokenizer, _partial_stop_len, find_stop_string, releasable_text
from ember.engine.sequence import Request, Sequence
from ember.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok(smol_llm):
    return smol_llm.tokenizer


def stream(tok, text: str, params: SamplingParams, prompt="Say:") -> tuple[Sequence, list[str]]:
    prompt_ids = tok.encode(prompt)
    seq = Sequence(0, Request("r", None, prompt_ids, params), 0)
    det = Detokenizer(tok)
    pieces = []
    for t in tok.encode(text, add_special_tokens=False):
        seq.token_ids.append(t)
        new = det.append_token(seq)
        hit = find_stop_string(seq, len(new))
        if hit:
            seq.detok.output_text = seq.detok.output_text[:hit[1]]
            pieces.append(releasable_text(seq, True))
            return seq, pieces
        pieces.append(releasable_text(seq, False))
    det.flush(seq)
    pieces.append(releasable_text(seq, True))
    return seq, pieces


@pytest.mark.parametrize("text", ["naïve café 東京タワー 🦀🔥 emoji", "plain ascii text, nothing odd",
                                  "   leading spaces\nand\ttabs", "ümlaut Ω≈ç√∫˜µ≤≥÷"])
def test_incremental_equals_full_decode(tok, text):
    seq, pieces = stream(tok, text, SamplingParams())
    assert "".join(pieces) == tok.decode(seq.output_token_ids)
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_split_across_tokens(tok):
    ids = tok.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1  # a byte-level BPE splits the emoji: the case under test
    seq, pieces = stream(tok, "🦀", SamplingParams())
    assert pieces[:-1] == [""] * (len(ids) - 1) or "".join(pieces) == "🦀"
    assert "".join(pieces) == "🦀"


def test_stop_string_split_across_tokens_never_leaks(tok):
    text = "alpha beta gamma delta"
    seq, pieces = stream(tok, text, SamplingParams(stop=["a gam"]))
    assert "".join(pieces) == "alpha bet"
    assert not any("gam" in p for p in pieces)


def test_partial_stop_len():
    assert _partial_stop_len("hello wor", ["world"]) == 3
    assert _partial_stop_len("hello", ["xyz"]) == 0
    assert _partial_stop_len("abc", ["c", "bcd"]) == 2
