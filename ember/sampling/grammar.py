"""The engine's view of a structured-output constraint: a per-sequence matcher that masks logits.

`SamplingParams.structured_output` holds a `GrammarSpec`; the engine asks its compiler for one `GrammarMatcher`
per sequence. The sampler masks every constrained row of a step before sampling; the engine feeds each sampled
token back, and finishes the sequence when the grammar is complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class GrammarMatcher(ABC):
    @abstractmethod
    def fill_mask(self, allowed: torch.Tensor) -> None:
        """Set `allowed` (bool, [vocab_size], initially all False) True for every token the grammar permits."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar rejects it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the output is complete: nothing but end-of-sequence may follow."""


class GrammarSpec(ABC):
    """A compiled constraint, shared by the sequences of a request; makes a fresh matcher for each."""

    @abstractmethod
    def new_matcher(self) -> GrammarMatcher: ...


def apply_grammar_masks(logits: torch.Tensor, matchers: list[GrammarMatcher | None]) -> None:
    """In place: -inf for every token a row's grammar forbids. One mask build per constrained row."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    allowed = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
    for j, i in enumerate(rows):
        m = matchers[i]
        assert m is not None
        m.fill_mask(allowed[j])
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device), float("-inf"))


def new_matcher(spec: Any) -> GrammarMatcher | None:
    return spec.new_matcher() if isinstance(spec, GrammarSpec) else None
