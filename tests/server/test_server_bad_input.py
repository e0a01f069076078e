"""Hostile input beyond test_server_errors.py: invalid UTF-8, absurd numbers, prompts past the context, odd
content types. Each is a 4xx OpenAI error object; the server stays healthy (and the autouse fixture checks
that nothing is left running)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ember.config import EMBEDDED_MODEL

HELLO = [{"role": "user", "content": "Say hello."}]
JSON = {"content-type": "application/json"}


def _error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "\xff\xfe bad bytes"}], "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": "ok"}], "max_tokens": 2, "stop": ["\xc3\x28"]}',
    b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}',  # a UTF-8-encoded surrogate: not valid UTF-8
])
def test_invalid_utf8_400(http: httpx.Client, raw: bytes) -> None:
    path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
    _error(http.post(path, content=raw, headers=JSON))


@pytest.mark.parametrize("extra, code", [
    ({"max_tokens": 10**12}, "context_length_exceeded"),
    ({"max_tokens": 10**30}, None),
    ({"max_tokens": -1}, None),
    ({"max_completion_tokens": 2**63}, None),
    ({"n": 10**20}, None),
    ({"top_logprobs": -1, "logprobs": True}, None),
    ({"seed": -(2**70)}, None),
    ({"temperature": 10**400}, None),
    ({"messages": [{"role": "user", "content": "x" * 5000}] * 2}, "context_length_exceeded"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, None),
    ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, None),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None),
])
def test_absurd_chat_values_400(http: httpx.Client, extra: dict[str, Any], code: str | None) -> None:
    err = _error(http.post("/v1/chat/completions", json={"model": EMBEDDED_MODEL, "messages": HELLO, **extra}))
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize("prompt", [[1] * 2000, [10**30], [[1, 2], [49152]], [[1], []], [-1, 5]])
def test_bad_token_prompts_400(http: httpx.Client, prompt: Any) -> None:
    _error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}))


def test_numbers_json_cannot_hold(http: httpx.Client) -> None:
    for raw in (b'{"prompt": "hi", "max_tokens": 1e400}', b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
                b'{"prompt": "hi", "temperature": 1e999999}', b'{"prompt": "hi", "top_p": -1e-999999999}'):
        r = http.post("/v1/completions", content=raw, headers=JSON)
        assert 400 <= r.status_code < 500, r.text


def test_odd_content_types_and_methods(http: httpx.Client) -> None:
    body = b'{"prompt": "hi", "max_tokens": 1}'
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = http.post("/v1/completions", content=body, headers=headers)
        assert r.status_code < 500, r.text
    assert http.put("/v1/completions", content=body).status_code == 405
    assert http.post("/v1/completions?stream=true&x=" + "y" * 4000, content=body, headers=JSON).status_code < 500
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 2}),  # booleans are not token ids
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}),
    ("/v1/chat/completions", {"messages": HELLO, "n": True, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "2"}),  # a numeric string is not a number
])
def test_wrong_json_types_not_coerced(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    _error(http.post(path, json={"model": EMBEDDED_MODEL, **body}))
    assert http.post("/v1/completions", json={"model": EMBEDDED_MODEL, "prompt": "ok", "max_tokens": 1,
                                              "temperature": 1}).status_code == 200  # ints still fit floats
