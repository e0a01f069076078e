"""Invalid requests get OpenAI error objects with the right status, and never hurt the server."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from ember.config import EMBEDDED_MODEL

MODEL = EMBEDDED_MODEL
HELLO = [{"role": "user", "content": "Say hello."}]


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    assert exc.value.code == "model_not_found"
    assert exc.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_context_overflow_400(client: openai.OpenAI) -> None:
    long_prompt = "hello " * 1100  # > --max-model-len 1024 tokens
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert exc.value.code == "context_length_exceeded"
    # A short prompt with max_tokens beyond the context, streamed: refused before the stream starts.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5000, stream=True)
    assert exc.value.code == "context_length_exceeded"
    # A batch where one prompt overflows fails as a whole, and the other prompt does not stay running
    # (the autouse fixture checks the engine is idle afterwards).
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=["hi", long_prompt], max_tokens=3)


@pytest.mark.parametrize("extra, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_logprobs": 3}, None),  # without logprobs=true
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias.5"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"seed": 2**70}, "seed"),
    ({"stream_options": {"include_usage": True}}, None),  # without stream
    ({"no_such_field": 1}, "no_such_field"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]}, "tools.0"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
])
def test_bad_chat_params_400(http: httpx.Client, extra: dict[str, Any], param: str | None) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, **extra}
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("body", [
    {"model": MODEL},  # no messages
    {"model": MODEL, "messages": []},
    {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": MODEL, "messages": [{"role": "user"}]},
    {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
    {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"model": MODEL, "messages": "hi"},
    {"model": MODEL, "messages": HELLO, "temperature": "hot"},
    {"model": MODEL, "messages": HELLO, "max_tokens": 1.5},
    [1, 2, 3],
    "just a string",
])
def test_malformed_chat_bodies_400(http: httpx.Client, body: Any) -> None:
    _error(http.post("/v1/chat/completions", json=body), 400)


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": ""},
    {"model": MODEL, "prompt": []},
    {"model": MODEL, "prompt": [[]]},
    {"model": MODEL, "prompt": [1, "a"]},
    {"model": MODEL, "prompt": [-5]},
    {"model": MODEL, "prompt": [49152]},
    {"model": MODEL, "prompt": "x", "logprobs": 21},
    {"model": MODEL, "prompt": "x", "suffix": "y"},
    {"model": MODEL, "prompt": "x", "best_of": 3},
])
def test_bad_completion_requests_400(http: httpx.Client, body: dict[str, Any]) -> None:
    _error(http.post("/v1/completions", json=body), 400)


_HI = b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}], '


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"", _HI + b'"temperature": NaN}',
                                 _HI + b'"temperature": Infinity}', _HI + b'"top_p": -Infinity}'])
def test_unparseable_bodies_400(http: httpx.Client, raw: bytes) -> None:
    _error(http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400)


def test_openai_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-2)
    assert exc.value.status_code == 400
    assert exc.value.param == "temperature"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert _error(http.get("/v1/nothing-here"), 404)["type"] == "not_found_error"
    _error(http.get("/v1/chat/completions"), 405)


def test_server_healthy_after_bad_input(http: httpx.Client, client: openai.OpenAI) -> None:
    for raw in (b"\x00" * 100, b"[" * 5000, b'{"messages": ' * 100):
        assert http.post("/v1/chat/completions", content=raw).status_code == 400
    assert http.get("/health").status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_api_key(live_server: Any, api_key: str) -> None:
    base = live_server.keyed_url
    for key in ("wrong", "", "test-key-12", api_key + "x"):
        bad = openai.OpenAI(base_url=base + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert exc.value.code == "invalid_api_key"
    with httpx.Client(base_url=base) as http:
        err = _error(http.get("/v1/models"), 401)  # no Authorization header at all
        assert err["code"] == "invalid_api_key"
        _error(http.get("/v1/models", headers={"Authorization": f"Basic {api_key}"}), 401)
        _error(http.post("/tokenize", json={"prompt": "x"}), 401)
        # Open without a key: health (for load balancers), version and the docs.
        assert http.get("/health").status_code == 200
        assert http.get("/version").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/docs").status_code == 200
        # Both configured keys work.
        assert http.get("/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200
    good = openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0)
    r = good.chat.completions.create(model="llm", messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content is not None
    spec = httpx.get(base + "/openapi.json").json()
    assert spec["paths"]["/v1/chat/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


@pytest.mark.parametrize("path, raw", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}'),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'),
    ("/v1/completions", b'{"prompt": "hi \\udfff", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}, "max_tokens": 2}'),
    ("/tokenize", b'{"prompt": "hi \\ud800"}'),
])
def test_lone_surrogates_400(http: httpx.Client, path: str, raw: bytes) -> None:
    """JSON escapes can carry text that is not valid Unicode; it must be refused, not crash the tokenizer."""
    _error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)
