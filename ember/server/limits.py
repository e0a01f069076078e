"""Backpressure: refuse work at once when the queue is full, and end requests that run past a deadline.

The scheduler caps the sequences that run (--max-num-seqs); without a cap on the rest, a burst queues without
bound and every client waits longer than it would take to retry elsewhere. The count lives here, on the event
loop, rather than in the engine's waiting queue: a burst arrives on the event loop before the step thread has
seen any of it, and a decision must be made for each request when it arrives.
"""

from __future__ import annotations

from ember.server.errors import SERVER_ERROR, APIError

RATE_LIMIT = "rate_limit_error"
RETRY_AFTER_S = 1  # what the 429 tells the client; a short queue drains in about that long


class Admission:
    """Counts engine sequences in flight (n per engine request) against `limit` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self, n: int) -> None:
        """Take n slots or raise a 429 APIError. Event-loop only (no lock needed: no await in between)."""
        if self.limit is not None and self.in_flight + n > self.limit:
            raise APIError(429, f"the server is at capacity ({self.limit} sequences running or queued); retry "
                                "shortly", RATE_LIMIT, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n


def timeout_error(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's --request-timeout of {seconds:g} s",
                    SERVER_ERROR, code="request_timeout")
