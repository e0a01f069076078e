"""ASGI middleware: request ids, per-request record (log line and HTTP metrics), and a request body cap.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one runs the app in a separate task and buffers the
receive channel, which breaks streaming disconnect detection and the context variable the record rides in.
"""

from __future__ import annotations

import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import APIError, error_json
from ember.server.metrics import ServerMetrics
from ember.server.request_log import RequestRecord, log_record, reset_record, set_record

# Polled by load balancers and Prometheus every few seconds: counted in the HTTP metrics, never logged.
UNLOGGED_PATHS = frozenset({"/health", "/metrics"})


def _request_id(scope: Scope) -> str:
    given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    return given if given and len(given) <= 200 and given.isprintable() else uuid.uuid4().hex


class RequestContextMiddleware:
    """Honour a client's X-Request-Id (or make one) and echo it, for tracing across hops; time the request and
    log one structured line for it when the response has been sent (for a stream: after its last event)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        record = RequestRecord(request_id, scope["method"], scope["path"])
        token = set_record(record)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            reset_record(token)
            end = time.monotonic()
            status = record.status or 500  # an exception before any response: ServerErrorMiddleware answers 500
            record.status = status
            # The route template ("/v1/models/{model_id:path}"), never the raw path, keeps label values bounded.
            route = scope.get("route")
            handler = getattr(route, "path", None) or "none"
            self.metrics.observe_http(scope["method"], handler, status, end - record.start)
            if self.log_requests and scope["path"] not in UNLOGGED_PATHS:
                log_record(record, end)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


class BodySizeLimitMiddleware:
    """Answer 413 to a body over `max_bytes` before the app parses any of it.

    A declared Content-Length is checked up front. A chunked body (no length) is read here up to the limit and
    replayed to the app; after the body, `receive` goes straight to the server again, because the disconnect
    watcher (streaming.cancel_on_disconnect) waits on it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await error_json(_too_large(self.max_bytes))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No declared length: buffer (bounded) so the 413 can still come before the app sees anything.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await error_json(_too_large(self.max_bytes))(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
