"""One record per HTTP request, filled in as it is served, and logged as one JSON line when it ends.

The record travels in a context variable rather than through every handler's arguments: the middleware sets it,
and the engine wrapper (`TrackedEngine.generate`) reads it from the same request's context. asyncio copies the
context into the tasks a request spawns (the disconnect watcher, the streaming body), and the record is one
mutable object, so what they add is seen by the middleware when it logs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("ember.requests")

_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("ember_request", default=None)


@dataclass
class RequestRecord:
    request_id: str  # the client's X-Request-Id, or a generated one
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    model: str | None = None
    engine_request_ids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_time: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None  # the error code when an engine request ended by raising (after headers were sent)
    status: int | None = None

    def to_json(self, end: float) -> str:
        ttft = None if self.first_token_time is None else round(self.first_token_time - self.start, 4)
        return json.dumps({
            "request_id": self.request_id, "method": self.method, "path": self.path, "status": self.status,
            "model": self.model, "engine_request_ids": self.engine_request_ids,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "ttft_s": ttft,
            "duration_s": round(end - self.start, 4), "finish_reasons": self.finish_reasons, "error": self.error,
        }, ensure_ascii=False)


def current_record() -> RequestRecord | None:
    return _current.get()


def set_record(record: RequestRecord) -> contextvars.Token[RequestRecord | None]:
    return _current.set(record)


def reset_record(token: contextvars.Token[RequestRecord | None]) -> None:
    _current.reset(token)


def log_record(record: RequestRecord, end: float) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", record.to_json(end))
