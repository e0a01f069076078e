"""The engine as the server sees it: a background step loop and one async output stream per request.

The step loop runs in its own thread: PyTorch releases the GIL inside kernels, so the HTTP event loop stays
responsive while the model runs. All engine state is touched by that thread only; callers talk to it through a
command queue, and outputs come back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from ember.config import EngineConfig
from ember.engine.errors import EngineDeadError
from ember.engine.llm_engine import LLMEngine
from ember.engine.request_stream import RequestStream
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None) -> None:
        self.config = config
        self.engine = engine or LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.arch.vocab_size
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.dead_error: BaseException | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        # Stopping tensor-parallel workers waits for their processes: not on the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    # -------------------------------------------------------------------------------------- requests
    async def generate(self, prompt: str | None, prompt_token_ids: list[int] | None, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request."""
        if self.dead_error is not None:
            raise EngineDeadError("the engine has stopped") from self.dead_error
        if not self.is_running:
            await self.start()
        assert self._loop is not None
        stream = self._streams[request_id] = RequestStream(self._loop)
        try:
            self._commands.put(("add", (request_id, prompt, prompt_token_ids, params, stream)))
            await stream.accepted  # raises RequestValidationError for a request the engine refuses
            while not stream.finished:
                yield await stream.next_output()
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    # ----------------------------------------------------------------------------------- step thread
    def _deliver(self, request_id: str, item: RequestOutput) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.fail(error)

    def _handle(self, kind: str, arg: Any) -> None:
        assert self._loop is not None
        if kind == "add":
            request_id, prompt, ids, params, stream = arg
            try:
                self.engine.add_request(request_id, prompt, ids, params)
            except Exception as e:  # validation errors go back to the caller, the loop goes on
                self._loop.call_soon_threadsafe(stream.accept, e)
            else:
                self._loop.call_soon_threadsafe(stream.accept)
        elif kind == "abort":
            self.engine.abort_request(arg)

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    kind, arg = self._commands.get(block=block, timeout=0.5 if block else None)
                    self._handle(kind, arg)
                    while True:  # drain everything that arrived during the last step
                        kind, arg = self._commands.get_nowait()
                        self._handle(kind, arg)
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished_requests():
                    continue
                for out in self.engine.step():
                    loop.call_soon_threadsafe(self._deliver, out.request_id, out)
        except BaseException as e:
            logger.exception("engine step loop died")
            self.dead_error = e
            # On the loop: every request registered by then, accepted or still waiting to be, learns of it.
            loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine failed: {e!r}"))
