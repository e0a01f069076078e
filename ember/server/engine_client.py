"""What the HTTP layer needs from the engine, as a structural type.

Two engines provide it: `AsyncEngine` (a step-loop thread in the server's process) and `ProcessEngine` (the
step loop in a process of its own, DESIGN §1); the server works with either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.tokenizer import Tokenizer


class EngineClient(Protocol):
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int

    @property
    def errored(self) -> bool: ...

    def generate(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...
