"""A request and its sequences: token ids, progress through the model, detokenized text, finish state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ember.outputs import PositionLogprobs
from ember.sampling.grammar import new_matcher
from ember.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class DetokenizerState:
    """Offsets for incremental decoding: text is decoded from a short window of token ids."""

    prefix_offset: int
    read_offset: int
    output_text: str = ""
    emitted_chars: int = 0  # how much of output_text has been handed to the caller


class Sequence:
    """One generated continuation of a prompt. A request with n > 1 owns n of them."""

    def __init__(self, seq_id: int, request: Request, index: int) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled on the device but not yet read back (async scheduling): counted in num_tokens, so the
        # scheduler plans the next step, but not yet in token_ids.
        self.num_pending = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first scheduling
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[PositionLogprobs] | None = [] if self.params.logprobs is not None else None
        self.emitted_tokens = 0
        self.emitted_logprobs = 0
        n = self.num_prompt_tokens
        self.detok = DetokenizerState(prefix_offset=max(n - 6, 0), read_offset=n)
        seed = self.params.seed
        # A private generator per sequence makes seeded sampling independent of the rest of the batch.
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(seed + index)
        self.num_preemptions = 0
        # Structured output: the grammar state of this sequence's output so far (None when unconstrained).
        self.grammar = new_matcher(self.params.structured_output)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def wants_prompt_logprobs(self, seq: Sequence) -> bool:
        """Prompt logprobs are computed once, by the first sequence, while its prompt is prefilled."""
        # A one-token prompt has nothing to score (its token has no context), and must not keep the request
        # wanting scores: that would keep every batch it is in off the CUDA graphs and the async overlap.
        if self.params.prompt_logprobs is None or seq.index != 0 or len(self.prompt_token_ids) <= 1:
            return False
        return self.prompt_logprobs is None or len(self.prompt_logprobs) < len(self.prompt_token_ids)
