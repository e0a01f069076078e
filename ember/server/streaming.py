"""Engine requests as the HTTP layer runs them: started before the response, merged, aborted on disconnect.

Cancellation is the subtle part. Starlette streams a response inside an anyio task group and cancels it when
the client goes away; inside a cancelled anyio scope every later `await` is cancelled again, so cleanup that
must reach the engine (aborting the request, which frees its KV blocks) runs in a shielded scope.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.engine_client import EngineClient
from ember.server.errors import SERVER_ERROR, APIError, ClientDisconnected, to_api_error

T = TypeVar("T")


class Generation:
    """One engine request. `start()` waits for its first output, so invalid requests fail before any byte of
    the HTTP response is sent; iterating yields that output and then the rest."""

    def __init__(self, engine: EngineClient, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self._stream = engine.generate(prompt, prompt_token_ids, params, request_id)
        self._first: RequestOutput | None = None
        self._started = False
        self.finished = False

    async def start(self) -> None:
        self._started = True
        try:
            self._first = await anext(aiter(self._stream))
        except StopAsyncIteration:
            self.finished = True
            raise APIError(500, "the engine ended the request without output", SERVER_ERROR) from None
        except Exception as e:
            self.finished = True  # a generator that raised is finished; nothing to abort
            raise to_api_error(e) from e

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        assert self._first is not None, "start() first"
        out = self._first
        self.finished = out.finished
        yield out
        if out.finished:
            return
        try:
            async for out in self._stream:
                self.finished = out.finished
                yield out
                if out.finished:
                    return
        except Exception:
            self.finished = True  # the engine ended the request itself by raising: nothing left to abort
            raise

    async def close(self) -> None:
        """Release the request in the engine if it is still running. Safe to call more than once."""
        with anyio.CancelScope(shield=True):
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                # "already running" when a cancelled task still unwinds inside it; the abort below covers it.
                with contextlib.suppress(RuntimeError):
                    await aclose()
            if self._started and not self.finished:
                self.finished = True
                await self.engine.abort(self.request_id)


async def start_all(gens: list[Generation]) -> None:
    """Start every generation; if any fails, release the others and raise the first failure."""
    results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_all(gens)
        raise failures[0]


async def close_all(gens: list[Generation]) -> None:
    for g in gens:
        await g.close()


_DONE = object()


async def merge(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several generations' outputs as they come, tagged with the generation's position."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for out in g:
                queue.put_nowait((i, out))
        except Exception as e:  # handed to the consumer, which raises it in the request's context
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _DONE))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def sse(payload: BaseModel, exclude_unset: bool = False) -> str:
    """One server-sent event. Chunks are dumped with exclude_unset, as vLLM does, so a delta carries only what
    changed while fields set explicitly to null (finish_reason, logprobs) still appear."""
    return f"data: {payload.model_dump_json(exclude_unset=exclude_unset)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs `on_close` however the stream ends: completed, failed, or cut
    off by the client (then Starlette cancels the body iterator and `on_close` aborts the engine requests)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", **(headers or {})})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(RuntimeError):
                        await aclose()
                await self._on_close()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already; uvicorn's receive() now blocks until the connection closes.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client disconnects first; then cancel it (its cleanup aborts the engine request)
    and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watcher.done():  # we were cancelled ourselves (server shutting down)
            task.cancel()
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()
