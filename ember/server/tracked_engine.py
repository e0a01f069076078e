"""The engine as the HTTP handlers see it: admission control, a deadline, metrics and the request record
wrapped around every `generate`, so the chat and completion handlers need not know about any of them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.engine_client import EngineClient
from ember.server.errors import APIError
from ember.server.limits import Admission, timeout_error
from ember.server.metrics import ServerMetrics
from ember.server.request_log import current_record
from ember.tokenizer import Tokenizer


class TrackedEngine:
    """An EngineClient that delegates to another and measures what passes through."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, model_name: str, admission: Admission,
                 request_timeout_s: float | None = None) -> None:
        self.inner = engine
        self.metrics = metrics
        self.label = model_name  # the model_name label: the canonical served name
        self.admission = admission
        self.request_timeout_s = request_timeout_s
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size

    @property
    def errored(self) -> bool:
        return self.inner.errored

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    async def generate(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        n = params.n
        m, label = self.metrics, self.label
        try:
            self.admission.acquire(n)  # a 429 leaves here, before the engine sees the request
        except APIError:
            m.rejected.labels(label).inc()
            raise
        start = time.monotonic()
        loop_now = asyncio.get_running_loop().time()  # asyncio's deadlines are on the loop's clock
        deadline = None if self.request_timeout_s is None else loop_now + self.request_timeout_s
        record = current_record()
        if record is not None:
            record.engine_request_ids.append(request_id)
            record.prompt_tokens += len(prompt_token_ids)
        stream = self.inner.generate(prompt, prompt_token_ids, params, request_id)
        last: RequestOutput | None = None
        tokens_seen = 0
        last_token_time: float | None = None
        queue_observed = False
        try:
            while True:
                try:
                    if deadline is None:
                        out = await anext(stream)
                    else:
                        # Only the wait for the engine is timed, never the consumer's work between outputs.
                        async with asyncio.timeout_at(deadline):
                            out = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    assert self.request_timeout_s is not None
                    raise timeout_error(self.request_timeout_s) from None
                now = time.monotonic()
                if not queue_observed and out.queue_time_s is not None:
                    queue_observed = True
                    m.queue_time.labels(label).observe(out.queue_time_s)
                count = sum(len(o.token_ids) for o in out.outputs)
                if count > tokens_seen:
                    if last_token_time is None:
                        m.ttft.labels(label).observe(now - start)
                        if record is not None and (record.first_token_time is None or now < record.first_token_time):
                            record.first_token_time = now
                    else:
                        m.itl.labels(label).observe(now - last_token_time)
                    last_token_time, tokens_seen = now, count
                last = out
                yield out
                if out.finished:
                    return
        except Exception as e:
            if record is not None:
                record.error = getattr(e, "code", None) or type(e).__name__
            raise
        finally:
            self.admission.release(n)
            self._finish(start, last, n, record)
            # Closing the engine's stream early is what aborts the request there (and frees its KV blocks).
            # Shielded: inside a cancelled anyio scope (a client that went away) every await is cancelled again.
            with anyio.CancelScope(shield=True), contextlib.suppress(RuntimeError):
                await stream.aclose()

    def _finish(self, start: float, last: RequestOutput | None, n: int, record: Any) -> None:
        m, label = self.metrics, self.label
        reasons = [o.finish_reason or "abort" for o in last.outputs] if last is not None else ["abort"] * n
        reasons += ["abort"] * (n - len(reasons))
        for reason in reasons:
            m.request_success.labels(label, reason).inc()
        if last is not None and last.finished:
            m.e2e.labels(label).observe(time.monotonic() - start)
        if record is not None:
            record.finish_reasons.extend(reasons)
            record.output_tokens += sum(len(o.token_ids) for o in last.outputs) if last is not None else 0
