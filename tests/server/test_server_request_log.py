"""One structured (JSON) log line per API request, carrying the client's X-Request-Id."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import pytest

HELLO = [{"role": "user", "content": "Say hello."}]


def _lines(caplog: pytest.LogCaptureFixture, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The log records for one request id; the line is written after the last byte, so wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ember.requests"]
        found = [f for f in found if f["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_one_line_per_request_with_client_id(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ember.requests")
    r = http.post("/v1/chat/completions", headers={"X-Request-Id": "trace-42"},
                  json={"model": "llm", "messages": HELLO, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42"
    usage = r.json()["usage"]
    [line] = _lines(caplog, "trace-42")
    assert line["method"] == "POST" and line["path"] == "/v1/chat/completions" and line["status"] == 200
    assert line["model"] == "llm"
    assert line["engine_request_ids"] == [r.json()["id"]]
    assert line["prompt_tokens"] == usage["prompt_tokens"] and line["output_tokens"] == usage["completion_tokens"]
    assert line["finish_reasons"] == ["length"] and line["error"] is None
    assert 0 < line["ttft_s"] <= line["duration_s"]


def test_stream_batch_and_error_lines(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ember.requests")
    body = {"model": "llm", "prompt": ["Hi", "Yo"], "n": 2, "max_tokens": 2, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "batch-1"}) as r:
        assert r.headers["x-request-id"] == "batch-1"
        r.read()
    [line] = _lines(caplog, "batch-1")
    assert len(line["engine_request_ids"]) == 2 and line["output_tokens"] == 2 * 2 * 2
    assert line["finish_reasons"] == ["length"] * 4
    # A rejected request is logged too, with its status and no tokens.
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1},
                  headers={"X-Request-Id": "bad-1"})
    assert r.status_code == 400
    [line] = _lines(caplog, "bad-1")
    assert line["status"] == 400 and line["output_tokens"] == 0 and line["ttft_s"] is None
    # Probes are not logged (they come every few seconds from load balancers and scrapers).
    http.get("/health", headers={"X-Request-Id": "probe-1"})
    http.get("/metrics", headers={"X-Request-Id": "probe-2"})
    assert _lines(caplog, "probe-1", timeout=0.3) == [] and _lines(caplog, "probe-2", timeout=0.0) == []


def test_hostile_request_ids_are_replaced(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ember.requests")
    for bad in ("x" * 201, "a\tb"):
        got = http.get("/version", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert got != bad and len(got) == 32
    # A quote or brace in an id cannot break the JSON line.
    http.get("/version", headers={"X-Request-Id": 'a"}{b'})
    assert _lines(caplog, 'a"}{b')[0]["path"] == "/version"
