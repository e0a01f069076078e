"""Per-request sampling parameters, with vLLM's names and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # 0: the prompt is only scored (with prompt_logprobs); no token is generated
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Grammar constraint, filled by the structured-output layer (opaque to the engine core).
    structured_output: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, msg: str, param: str) -> None:
            if not cond:
                raise SamplingParamsError(msg, param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v), f"{name} must be a finite number", name)
        check(isinstance(self.n, int) and self.n >= 1, f"n must be at least 1, got {self.n}", "n")
        check(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}",
              "temperature")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        check(isinstance(self.top_k, int) and self.top_k >= 0,
              f"top_k must be -1 (disable) or at least 1, got {self.top_k}", "top_k")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        check(0.0 < self.repetition_penalty <= 2.0 or self.repetition_penalty > 0.0,
              f"repetition_penalty must be positive, got {self.repetition_penalty}", "repetition_penalty")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
              f"max_tokens must be non-negative, got {self.max_tokens}", "max_tokens")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be non-negative, got {self.min_tokens}", "min_tokens")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        check(self.prompt_logprobs is None
              or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
              f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}", "prompt_logprobs")
        check(self.seed is None or isinstance(self.seed, int), "seed must be an integer", "seed")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings",
              "stop")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers", "stop_token_ids")
        if self.logit_bias is not None:
            clean: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                try:
                    tok = int(k)
                except (TypeError, ValueError):
                    raise SamplingParamsError(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
                check(isinstance(v, (int, float)) and math.isfinite(v) and -100 <= v <= 100,
                      f"logit_bias values must be in [-100, 100], got {v!r}", "logit_bias")
                clean[tok] = float(v)
            self.logit_bias = clean

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: they read the sequence's tokens so far."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        for tok in list(self.logit_bias or {}) + self.stop_token_ids:
            if not 0 <= tok < vocab_size:
                raise SamplingParamsError(f"token id {tok} is out of the vocabulary (size {vocab_size})",
                                          "logit_bias" if tok in (self.logit_bias or {}) else "stop_token_ids")

    def clone(self, **changes: Any) -> SamplingParams:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(changes)
        return SamplingParams(**d)
