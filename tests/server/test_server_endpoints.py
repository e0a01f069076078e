"""/v1/models, /health, /version, /tokenize, /detokenize, the docs, request ids; health while loading or dead."""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from ember.config import EMBEDDED_MODEL
from ember.engine.errors import EngineDeadError
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.app import attach_engine, build_app
from ember.server.config import ServerConfig


def test_models_list_every_name_canonical_first(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [EMBEDDED_MODEL, "llm"]
    for m in models:
        assert m.object == "model" and m.owned_by == "ember" and m.created > 0
        extra = m.model_extra or {}
        assert extra["root"] == EMBEDDED_MODEL
        assert extra["max_model_len"] == 1024
    assert client.models.retrieve("llm").id == "llm"
    assert client.models.retrieve(EMBEDDED_MODEL).id == EMBEDDED_MODEL  # a name with a slash in the path


def test_health_and_version(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert http.get("/version").json() == {"version": importlib.metadata.version("ember")}


def test_tokenize_detokenize_roundtrip(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": "llm", "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 1024
    assert r["token_strs"] == ["Hello", "Ġworld"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_tokenize_chat_uses_template(http: httpx.Client) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = http.post("/tokenize", json={"messages": msgs}).json()
    text = http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_gen = http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert no_gen["count"] < r["count"]
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert http.post("/tokenize", json={"messages": dev}).json()["tokens"] == r["tokens"]


def test_docs_and_openapi_describe_the_routes(http: httpx.Client) -> None:
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                ("/v1/models/{model_id}", "get"), ("/health", "get"), ("/version", "get"), ("/metrics", "get"),
                ("/tokenize", "post"), ("/detokenize", "post")}
    assert {(p, m) for p, ops in paths.items() for m in ops} == expected
    for ops in paths.values():
        for op in ops.values():
            assert "422" not in op["responses"]  # ember answers validation errors with 400
    chat = paths["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "404", "413", "429", "500", "503", "504"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    stream = chat["responses"]["200"]["content"]["text/event-stream"]["schema"]["$ref"]
    schemas = spec["components"]["schemas"]
    assert stream.rsplit("/", 1)[1] in schemas
    req = schemas["ChatCompletionRequest"]
    assert req["additionalProperties"] is False
    assert {"messages", "max_completion_tokens", "stream_options", "top_k", "ignore_eos"} <= set(req["properties"])
    # Every $ref points at a schema that exists.
    refs: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            refs.extend(v for k, v in x.items() if k == "$ref")
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(spec)
    assert refs and all(r.rsplit("/", 1)[1] in schemas for r in refs)


def test_request_id_echoed(http: httpx.Client) -> None:
    assert http.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = http.get("/health").headers["x-request-id"]
    assert len(generated) == 32


class _StubEngine:
    """Just enough of an engine for the app to be wired to one that has died."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model_name = EMBEDDED_MODEL
        self.max_model_len = 1024
        self.vocab_size = tokenizer.vocab_size
        self.errored = True

    def stats(self) -> dict[str, Any]:  # what /metrics reads; an idle engine
        return {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "prompt_tokens_total": 0,
                "generation_tokens_total": 0, "num_preemptions": 0, "prefix_cache_queries": 0,
                "prefix_cache_hits": 0}


def test_health_503_while_loading_then_dead(live_server: Any) -> None:
    app = build_app(None, ServerConfig())
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert c.get("/docs").status_code == 200  # the docs are up before the model
        attach_engine(app, _StubEngine(live_server.engine.tokenizer))
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"


class _DyingEngine(_StubEngine):
    """Streams one token, then its step loop "dies"."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.errored = False
        self.aborted: list[str] = []

    async def generate(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        out = CompletionOutput(index=0, text="Hi", token_ids=[1], delta_text="Hi", delta_token_ids=[1])
        yield RequestOutput(request_id, prompt, prompt_token_ids, [out], finished=False)
        raise EngineDeadError("the step loop died")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_engine_death_mid_stream_is_an_error_event(live_server: Any) -> None:
    engine = _DyingEngine(live_server.engine.tokenizer)
    with TestClient(build_app(engine, ServerConfig(served_model_names=["m"]))) as http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        stream = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        received = []
        with pytest.raises(openai.APIError, match="engine has stopped"):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        assert received == ["", "Hi"]  # the role chunk and the one token, then the error event
        # Not streamed: a 500 error object.
        with pytest.raises(openai.InternalServerError):
            sdk.completions.create(model="m", prompt="hi")
    assert engine.aborted == []  # a generator that raised is over: nothing to abort
