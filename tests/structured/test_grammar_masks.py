"""The sampler's grammar hook: packed bitmasks applied to a batch, against a plain masked_fill reference."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from ember.sampling.grammar import (
    GrammarMatcher,
    GrammarSpec,
    apply_grammar_masks,
    apply_token_bitmask,
    bitmask_words,
)


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, ceil(V/32)] int32, token t at bit t % 32 of word t // 32."""
    b, v = allowed.shape
    padded = torch.zeros(b, bitmask_words(v) * 32, dtype=torch.bool)
    padded[:, :v] = allowed
    return torch.from_numpy(np.packbits(padded.numpy(), axis=1, bitorder="little").view(np.int32).copy())


@pytest.mark.parametrize("vocab", [31, 32, 33, 1000, 49152])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_apply_token_bitmask_matches_masked_fill(vocab: int, density: float) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g)
    allowed = torch.rand(3, vocab, generator=g) < density
    want = logits.masked_fill(~allowed, float("-inf"))
    apply_token_bitmask(logits, pack(allowed), None)
    assert torch.equal(logits, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_token_bitmask_rows_and_narrow_mask(dtype: torch.dtype) -> None:
    logits = torch.randn(4, 100).to(dtype)
    original = logits.clone()
    allowed = torch.rand(2, 64) < 0.5  # the grammar's vocabulary is smaller than the logits'
    apply_token_bitmask(logits, pack(allowed), [1, 3])
    assert torch.equal(logits[[0, 2]], original[[0, 2]])  # unconstrained rows untouched
    for j, r in enumerate([1, 3]):
        assert torch.equal(logits[r, :64], original[r, :64].masked_fill(~allowed[j], float("-inf")))
        assert torch.isinf(logits[r, 64:]).all()  # past the grammar's vocabulary: forbidden


class SetMatcher(GrammarMatcher):
    """Allows a fixed token set; records how it was filled."""

    batch_calls = 0

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def fill_bitmask(self, row: torch.Tensor) -> None:
        for t in self.tokens:
            word = int(row[t // 32]) | (1 << (t % 32))
            row[t // 32] = word - (1 << 32) if word >= 1 << 31 else word

    def accept_token(self, token_id: int) -> bool:
        return token_id in self.tokens

    def is_terminated(self) -> bool:
        return False

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        cls.batch_calls += 1
        super().fill_bitmasks(matchers, bitmask)


class OtherMatcher(SetMatcher):
    pass


def test_apply_grammar_masks_mixed_batch() -> None:
    logits = torch.randn(5, 70)
    original = logits.clone()
    matchers: list[GrammarMatcher | None] = [SetMatcher([3, 31, 63]), None, OtherMatcher([0, 69]), None,
                                             SetMatcher([32])]
    SetMatcher.batch_calls = OtherMatcher.batch_calls = 0
    apply_grammar_masks(logits, matchers)
    # One fill call per matcher class, not per row.
    assert SetMatcher.batch_calls == 1 and OtherMatcher.batch_calls == 1
    for row, toks in [(0, [3, 31, 63]), (2, [0, 69]), (4, [32])]:
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == toks
        assert torch.equal(logits[row, toks], original[row, toks])
    assert torch.equal(logits[[1, 3]], original[[1, 3]])


def test_apply_grammar_masks_no_matchers_is_a_no_op() -> None:
    logits = torch.randn(2, 10)
    original = logits.clone()
    apply_grammar_masks(logits, [None, None])
    assert torch.equal(logits, original)


class RejectingMatcher(SetMatcher):
    """Its mask allows a token that `accept_token` then refuses: what a wrong mask would look like."""

    def accept_token(self, token_id: int) -> bool:
        return False


class RejectingSpec(GrammarSpec):
    def new_matcher(self) -> GrammarMatcher:
        return RejectingMatcher([42])


def test_a_token_the_grammar_rejects_is_logged(smol_llm, caplog: pytest.LogCaptureFixture) -> None:
    from ember import SamplingParams

    with caplog.at_level(logging.ERROR, logger="ember.engine.llm_engine"):
        out = smol_llm.generate("Hi", SamplingParams(max_tokens=2, structured_output=RejectingSpec()))[0]
    assert out.outputs[0].token_ids == [42, 42]
    assert "its grammar rejected the sampled token 42" in caplog.text
