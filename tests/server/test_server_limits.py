"""Backpressure and limits: a full queue answers 429 at once, a request past --request-timeout ends with 504,
an oversized body gets 413; none of them leaves anything running in the engine."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from ember.config import EMBEDDED_MODEL
from ember.server.app import build_app, get_state
from ember.server.config import ServerConfig
from ember.server.tracked_engine import TrackedEngine

NAMES = [EMBEDDED_MODEL, "llm"]
HELLO = [{"role": "user", "content": "Say hello."}]
LONG = {"model": "llm", "messages": HELLO, "max_tokens": 600, "ignore_eos": True}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@contextlib.contextmanager
def _streaming(url: str, body: dict[str, Any]) -> Iterator[httpx.Response]:
    """A streamed request that has produced its first event, held open while the block runs."""
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                               json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        # Keep the line iterator alive: once it is garbage-collected, httpcore closes the connection.
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        yield resp
        del lines


def test_queue_full_429_at_once(live_server: Any) -> None:
    # One running slot and one queue slot: two requests in flight fill it; a third is refused at once.
    config = ServerConfig(served_model_names=NAMES, max_num_seqs=1, max_queue_len=1)
    with live_server.extra_app(config) as (url, app), _streaming(url, LONG), _streaming(url, LONG):
        engine = get_state(app).engine
        assert isinstance(engine, TrackedEngine) and engine.admission.in_flight == 2
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "max_tokens": 2}, timeout=30)
        assert time.monotonic() - start < 2.0  # refused, not queued
        err = _error(r, 429)
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1"
        assert r.headers["x-request-id"]
        # n counts: a request for two choices does not fit where one might.
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model="llm", prompt="Hi", max_tokens=2, n=2)
        metrics = httpx.get(f"{url}/metrics").text
        assert f'ember:requests_rejected_total{{model_name="{EMBEDDED_MODEL}"}} 2.0' in metrics
    # The two streams were closed: their slots are free again.
    with live_server.extra_app(config) as (url, app):
        r = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        assert get_state(app).engine.admission.in_flight == 0  # type: ignore[union-attr]


def test_batch_partly_admitted_releases_everything(live_server: Any) -> None:
    """A completions batch that does not fit is refused as a whole, and the prompts admitted before the one
    that did not fit are released (the autouse fixture checks that nothing is left in the engine)."""
    config = ServerConfig(served_model_names=NAMES, max_num_seqs=2, max_queue_len=0)
    with live_server.extra_app(config) as (url, app):
        r = httpx.post(f"{url}/v1/completions", json={"model": "llm", "prompt": ["a", "b", "c"], "max_tokens": 50,
                                                       "ignore_eos": True}, timeout=60)
        assert _error(r, 429)["code"] == "queue_full"
        assert get_state(app).engine.admission.in_flight == 0  # type: ignore[union-attr]
        r = httpx.post(f"{url}/v1/completions", json={"model": "llm", "prompt": ["a", "b"], "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_request_timeout_504(live_server: Any) -> None:
    config = ServerConfig(served_model_names=NAMES, request_timeout_s=3.0)
    with live_server.extra_app(config) as (url, _):
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=60)
        assert time.monotonic() - start < 15  # 600 tokens on a CPU take far longer
        err = _error(r, 504)
        assert err["code"] == "request_timeout"
        # Streamed: the stream has begun, so the timeout arrives as an error event, then [DONE].
        with httpx.Client(base_url=url, timeout=60) as c, \
                c.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        # A one-token request finishes well within the limit.
        assert httpx.post(f"{url}/v1/chat/completions", json={**LONG, "max_tokens": 1}, timeout=60).status_code == 200
    s = live_server.wait_idle()
    assert s["num_running"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]


def test_body_over_the_limit_413_real_server(http: httpx.Client) -> None:
    # The default limit is 16 MiB; this body is just over it and is never parsed.
    big = b'{"prompt": "' + b"a" * (16 * 2**20) + b'"}'
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    err = _error(r, 413)
    assert err["code"] == "request_too_large"
    assert http.get("/health").status_code == 200


def test_body_limit_declared_and_chunked() -> None:
    app = build_app(None, ServerConfig(max_request_body_bytes=1000))
    with TestClient(app) as c:
        small = json.dumps({"messages": HELLO}).encode()
        # Within the limit the request reaches the app (503: no model loaded in this app).
        assert c.post("/v1/chat/completions", content=small).status_code == 503
        assert _error(c.post("/v1/chat/completions", content=b"x" * 1001), 413)["code"] == "request_too_large"

        def chunks(total: int) -> Iterator[bytes]:  # no Content-Length: sent chunked
            for _ in range(total // 100):
                yield b" " * 100

        assert _error(c.post("/v1/chat/completions", content=chunks(2000)), 413)["code"] == "request_too_large"
        r = c.post("/v1/chat/completions", content=iter([small]))
        assert r.status_code == 503  # a chunked body within the limit is replayed to the app intact
