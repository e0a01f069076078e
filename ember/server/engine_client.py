"""What the HTTP layer needs from the engine, as a structural type.

The server depends on this protocol, not on `AsyncEngine` itself, so the engine core can move into its own
process later (DESIGN §1) behind a client object with the same surface.
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
