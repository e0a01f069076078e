"""The engine's view of a structured-output constraint: a per-sequence matcher that masks logits.

`SamplingParams.structured_output` holds a `GrammarSpec`; the engine asks it for one `GrammarMatcher` per
sequence. Each step the sampler builds one packed bitmask for every constrained row of the batch (the matchers
fill it on the CPU: that is where grammar engines work) and applies it to the logits in one op; the engine feeds
each sampled token back, and finishes the sequence when the grammar is complete.

Why a packed int32 bitmask rather than a bool row per sequence: it is what grammar engines (llguidance,
xgrammar) produce natively, it is 8x smaller to build and to copy to the GPU, and one gather + add serves
the whole batch (measured in docs/STRUCTURED_OUTPUT.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where masks are applied: the HTTP server uses these types without needing torch
    import torch


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a packed token bitmask."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    @abstractmethod
    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed tokens into `row` (int32, CPU, contiguous, [bitmask_words(V)], zero on entry):
        token t is allowed iff bit t % 32 of row[t // 32] is set. Tokens past the matcher's vocabulary stay 0."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar rejects it."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the output is complete: nothing but end-of-sequence may follow."""

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill row j of `bitmask` for matchers[j] (all of this class). Subclasses may do it in parallel."""
        for j, m in enumerate(matchers):
            m.fill_bitmask(bitmask[j])


class GrammarSpec(ABC):
    """A compiled constraint, shared by the sequences of a request; makes a fresh matcher for each."""

    @abstractmethod
    def new_matcher(self) -> GrammarMatcher: ...


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: row b holds 0.0 where bit k of byte b is set, -inf where it is clear."""
    import torch

    table = _BYTE_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _BYTE_TABLES[device] = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
    return table


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> None:
    """In place: -inf in `logits[rows]` (all rows if None) wherever the packed `bitmask` [len(rows), W] has a 0.

    The packed words cross to the logits' device (W int32 a row) and expand there into an additive 0 / -inf
    mask through a 256-entry byte table: one gather and one add, with no data-dependent branches. On the CPU
    this is ~6x faster than unpacking bits and `masked_fill` on a mixed mask (masked_fill branches per element).
    """
    import torch

    vocab = logits.shape[1]
    device = logits.device
    byte_idx = bitmask.to(device, non_blocking=True).view(torch.uint8).reshape(-1).int()
    add = torch.index_select(_byte_table(device), 0, byte_idx).view(bitmask.shape[0], -1).to(logits.dtype)
    if add.shape[1] >= vocab:
        add = add[:, :vocab]
    else:  # a bitmask narrower than the logits forbids the rest
        add = torch.nn.functional.pad(add, (0, vocab - add.shape[1]), value=float("-inf"))
    if rows is None:
        logits.add_(add)
    else:
        logits.index_add_(0, torch.tensor(rows, device=device), add)


def apply_grammar_masks(logits: torch.Tensor, matchers: list[GrammarMatcher | None]) -> None:
    """In place: -inf for every token a row's grammar forbids; one bitmask and one masking op for the batch."""
    import torch

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = torch.zeros(len(rows), bitmask_words(logits.shape[1]), dtype=torch.int32)
    # Group by matcher class so an engine can fill its rows in one (parallel) call.
    by_class: dict[type[GrammarMatcher], list[int]] = {}
    for j, i in enumerate(rows):
        by_class.setdefault(type(matchers[i]), []).append(j)  # type: ignore[arg-type]
    for cls, js in by_class.items():
        group: list[GrammarMatcher] = [matchers[rows[j]] for j in js]  # type: ignore[misc]
        if len(js) == len(rows):
            cls.fill_bitmasks(group, bitmask)
        else:
            part = torch.zeros(len(js), bitmask.shape[1], dtype=torch.int32)
            cls.fill_bitmasks(group, part)
            bitmask[js] = part
    apply_token_bitmask(logits, bitmask, None if len(rows) == logits.shape[0] else rows)


def new_matcher(spec: Any) -> GrammarMatcher | None:
    return spec.new_matcher() if isinstance(spec, GrammarSpec) else None
