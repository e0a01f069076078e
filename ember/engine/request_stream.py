"""One request as an engine client's event loop sees it: the engine's verdict on adding it, then its outputs.

`AsyncEngine` (a step-loop thread) and `ProcessEngine` (an engine process) both hand a request's outputs to the
event loop through one of these; only how they reach the engine differs.
"""

from __future__ import annotations

import asyncio

from ember.outputs import RequestOutput


class RequestStream:
    """Filled on the event loop (the engine's threads post to it with `call_soon_threadsafe`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.accepted: asyncio.Future[None] = loop.create_future()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False  # the last output read was the request's final one

    def accept(self, error: BaseException | None = None) -> None:
        """The engine took the request, or refused it with `error` (raised to the reader)."""
        if self.accepted.done():
            return
        if error is None:
            self.accepted.set_result(None)
        else:
            self.accepted.set_exception(error)

    def put(self, item: RequestOutput | BaseException) -> None:
        """An output, or an error that ends the stream for its reader."""
        self._queue.put_nowait(item)

    def fail(self, error: BaseException) -> None:
        """The engine is gone: a reader waiting for the verdict or for an output gets `error`."""
        self.accept(error)
        self.put(error)

    async def next_output(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.finished = item.finished
        return item
