"""The server's side of an engine in its own process: `AsyncEngine`'s surface over two pipes.

`ember serve` on a GPU runs the engine core in a spawned process (`ember/engine/engine_core.py`), so that HTTP
work never holds the GIL the step loop needs. This client starts that process, waits for it to load, and then
turns the core's per-step deltas back into the `RequestOutput`s an in-process engine would give: full text and
token ids so far plus what is new. Two threads move bytes: one sends commands (so the event loop never blocks on
a full pipe), one receives updates and hands each to the event loop as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import pickle
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from ember.config import EngineConfig
from ember.engine.engine_core import EngineInfo, RequestDelta, run_engine_core
from ember.engine.errors import EngineDeadError, RequestValidationError
from ember.engine.request_stream import RequestStream
from ember.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from ember.sampling_params import SamplingParams
from ember.structured.portable import portable_params

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 1800.0  # loading a large model from a slow disk takes minutes
STOP_TIMEOUT_S = 30.0  # a tensor-parallel engine stops its own workers first


class _Accumulated:
    """A request's outputs so far, rebuilt from the deltas."""

    def __init__(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.texts = [""] * params.n
        self.token_ids: list[list[int]] = [[] for _ in range(params.n)]
        self.logprobs: list[list[PositionLogprobs] | None] = [
            [] if params.logprobs is not None else None for _ in range(params.n)]
        # One list for all outputs, growing as the prompt's chunks are prefilled (as the in-process engine's).
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None

    def apply(self, d: RequestDelta) -> RequestOutput:
        if d.prompt_logprobs is not None:
            if self.prompt_logprobs is None:
                self.prompt_logprobs = []
            self.prompt_logprobs.extend(d.prompt_logprobs)
        outs = []
        for c in d.outputs:
            i = c.index
            self.texts[i] += c.text
            self.token_ids[i].extend(c.token_ids)
            lps = self.logprobs[i]
            if lps is not None and c.logprobs is not None:
                lps.extend(c.logprobs)
            # Copies: an output handed out earlier keeps what it said (as the in-process engine's do).
            outs.append(CompletionOutput(
                index=i, text=self.texts[i], token_ids=list(self.token_ids[i]),
                logprobs=None if lps is None else list(lps), delta_text=c.text, delta_token_ids=c.token_ids,
                delta_logprobs=c.logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return RequestOutput(d.request_id, self.prompt, self.prompt_token_ids, outs, d.finished,
                             self.prompt_logprobs, num_cached_tokens=d.num_cached_tokens, queue_time_s=d.queue_time_s)


class ProcessEngine:
    """Starts the engine process and waits until it has loaded (blocking: call it off the event loop)."""

    def __init__(self, config: EngineConfig, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.config = config
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        cmd_recv, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_send = ctx.Pipe(duplex=False)
        # Not a daemon: a tensor-parallel engine starts worker processes of its own, which daemons may not.
        self.proc = ctx.Process(target=run_engine_core, name="ember-engine-core",
                                args=(config, cmd_recv, out_send, logging.getLogger().getEffectiveLevel()))
        self.proc.start()
        cmd_recv.close()
        out_send.close()
        # Also at interpreter exit, ahead of multiprocessing's own handler, which would wait for the process.
        self._serving = threading.Event()  # the process reads commands: a stop message reaches it
        self._finalizer = weakref.finalize(self, _stop_process, self.proc, self._cmd, self._out, self._serving)
        try:
            info = self._wait_ready(ready_timeout_s)
        except BaseException:
            self._finalizer()
            raise
        self._serving.set()
        self.tokenizer = info.tokenizer
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self._stats = info.stats
        self._streams: dict[str, RequestStream] = {}
        self._requests: dict[str, _Accumulated] = {}
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self.dead_error: BaseException | None = None

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while not self._out.poll(0.1):
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine process exited (code {self.proc.exitcode}) while loading; see its "
                                   "log above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine process did not load within {timeout_s:.0f} s")
        try:
            kind, detail = self._out.recv()
        except EOFError:
            self.proc.join(5.0)
            raise RuntimeError(f"the engine process exited (code {self.proc.exitcode}) while loading; see its log "
                               "above") from None
        if kind != "ready":
            raise detail
        return detail

    # ------------------------------------------------------------------------------------- lifecycle
    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    @property
    def is_running(self) -> bool:
        return bool(self._threads)

    async def start(self) -> None:
        if self.is_running or self._stopped:
            return
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._send_loop, name="ember-engine-send", daemon=True),
                         threading.Thread(target=self._receive_loop, name="ember-engine-receive", daemon=True)]
        for t in self._threads:
            t.start()

    async def shutdown(self) -> None:
        """Stop the engine process (it finishes the step it is in); requests still streaming fail with
        EngineDeadError. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        if self._threads:  # the sending thread owns the pipe: the stop message goes after what it has queued
            self._sends.put(pickle.dumps(("shutdown",)))
            self._sends.put(None)
            await loop.run_in_executor(None, self.proc.join, STOP_TIMEOUT_S)
        await loop.run_in_executor(None, self._finalizer)
        for t in self._threads:
            await loop.run_in_executor(None, t.join, 5.0)
        self._threads = []
        self._fail_all(EngineDeadError("the engine has been shut down"))

    # -------------------------------------------------------------------------------------- requests
    async def generate(self, prompt: str | None, prompt_token_ids: list[int] | None, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request."""
        if self.dead_error is not None:
            raise EngineDeadError("the engine has stopped") from self.dead_error
        if self._stopped:
            raise EngineDeadError("the engine has been shut down")
        if not self.is_running:
            await self.start()
        assert self._loop is not None
        if request_id in self._streams:
            raise RequestValidationError(f"request id {request_id!r} is already in use", "request_id")
        if prompt_token_ids is None and prompt is not None:  # encoded here: the outputs carry the prompt's ids
            prompt_token_ids = self.tokenizer.encode(prompt)
        stream = self._streams[request_id] = RequestStream(self._loop)
        # Without any prompt the engine refuses the request (LLMEngine.add_request holds that rule).
        self._requests[request_id] = _Accumulated(prompt, list(prompt_token_ids or []), params)
        try:
            # Pickled here, so that a request that cannot cross to the engine process fails on its own.
            try:
                add = pickle.dumps(("add", request_id, prompt, prompt_token_ids, portable_params(params)))
            except Exception as e:
                raise RequestValidationError(f"the request cannot be sent to the engine process: {e}") from e
            self._sends.put(add)
            await stream.accepted  # raises RequestValidationError for a request the engine refuses
            while not stream.finished:
                yield await stream.next_output()
        finally:
            self._streams.pop(request_id, None)
            self._requests.pop(request_id, None)
            if not stream.finished:
                self._sends.put(pickle.dumps(("abort", request_id)))

    async def abort(self, request_id: str) -> None:
        self._sends.put(pickle.dumps(("abort", request_id)))

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (sent with every step's outputs)."""
        return dict(self._stats)

    # ------------------------------------------------------------------------------- pipe threads
    def _send_loop(self) -> None:
        while (msg := self._sends.get()) is not None:
            try:
                self._cmd.send_bytes(msg)
            except (OSError, ValueError):  # the process is gone: the receiving thread reports it
                return

    def _receive_loop(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = self._out.recv()
            except (EOFError, OSError):
                if self._stopped:
                    return
                self.proc.join(5.0)
                msg = ("dead", RuntimeError(f"the engine process exited (code {self.proc.exitcode})"))
            try:
                self._loop.call_soon_threadsafe(self._on_message, msg)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                return
            if msg[0] == "dead":
                return

    def _on_message(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "update":
            _, replies, deltas, stats = msg
            self._stats = stats
            for request_id, error in replies:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.accept(error)
            for d in deltas:
                acc, stream = self._requests.get(d.request_id), self._streams.get(d.request_id)
                if acc is not None and stream is not None:
                    stream.put(acc.apply(d))
        elif msg[0] == "dead" and self.dead_error is None:
            error = msg[1]
            logger.error("the engine process has died: %r", error)
            self.dead_error = error
            self._fail_all(EngineDeadError(f"the engine failed: {error!r}"))

    def _fail_all(self, error: EngineDeadError) -> None:
        for stream in self._streams.values():
            stream.fail(error)


def _stop_process(proc: Any, cmd: Connection, out: Connection, serving: threading.Event) -> None:
    """Ask the engine process to stop, then kill it if it has not (it ignores SIGTERM: see `run_engine_core`);
    one still loading (Ctrl-C during a long load) reads no message: killed at once."""
    if proc.is_alive() and serving.is_set():
        with contextlib.suppress(OSError, ValueError):
            cmd.send(("shutdown",))
        proc.join(STOP_TIMEOUT_S)
    if proc.is_alive():
        logger.warning("the engine process did not stop in %.0f s: killing it", STOP_TIMEOUT_S)
        proc.kill()
        proc.join(5.0)
    cmd.close()
    out.close()
