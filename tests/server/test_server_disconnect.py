"""A client that goes away aborts its request: nothing keeps running, every KV block comes back."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from ember.config import EMBEDDED_MODEL

LONG = 600  # tokens a request would generate if nobody aborted it: far more than the tests wait for
STORY = [{"role": "user", "content": "Tell me a very long story."}]


def _body(stream: bool) -> dict[str, Any]:
    return {"model": EMBEDDED_MODEL, "messages": STORY, "max_tokens": LONG, "ignore_eos": True,
            "temperature": 0, "stream": stream}


def _wait_running(live_server: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while live_server.stats()["num_running"] == 0:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.02)


def _assert_aborted(live_server: Any, generated_before: int, limit: int = LONG) -> None:
    s = live_server.wait_idle(timeout=15)
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["num_free_blocks"] == s["num_total_blocks"], s
    # It stopped early: far fewer tokens than the request asked for were generated.
    assert s["generation_tokens_total"] - generated_before < limit, s


def test_sdk_stream_closed_early_aborts(live_server: Any, client: openai.OpenAI) -> None:
    before = live_server.stats()["generation_tokens_total"]
    stream = client.chat.completions.create(model=EMBEDDED_MODEL, messages=STORY, max_tokens=LONG,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += sum(1 for c in chunk.choices if c.delta.content)
        if got >= 3:
            break
    assert live_server.stats()["num_running"] == 1  # it is in flight now...
    stream.close()  # ...and the client hangs up
    _assert_aborted(live_server, before)


def test_raw_sse_disconnect_aborts(live_server: Any) -> None:
    before = live_server.stats()["generation_tokens_total"]
    with httpx.Client(base_url=live_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=_body(True)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                assert json.loads(line[6:])["object"] == "chat.completion.chunk"
                events += 1
            if events >= 3:
                break
    _assert_aborted(live_server, before)


def test_non_streaming_client_timeout_aborts(live_server: Any) -> None:
    before = live_server.stats()["generation_tokens_total"]
    with httpx.Client(base_url=live_server.url, timeout=httpx.Timeout(60, read=1.0)) as http, \
            pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=_body(False))
    _assert_aborted(live_server, before)


def test_completions_batch_disconnect_aborts_every_prompt(live_server: Any) -> None:
    before = live_server.stats()["generation_tokens_total"]
    body = {"model": "llm", "prompt": ["Once upon a time", "In a galaxy far away", "1, 2, 3,"], "n": 2,
            "max_tokens": LONG // 6, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert live_server.stats()["num_running"] == 6  # 3 prompts x n=2 sequences
    _assert_aborted(live_server, before)


def test_disconnect_storm(live_server: Any) -> None:
    """Many clients hanging up at different moments (before headers, after a few events) leave nothing behind."""
    before = live_server.stats()["generation_tokens_total"]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            if i % 2:  # hang up before the first token can have been generated
                with httpx.Client(base_url=live_server.url, timeout=httpx.Timeout(30, read=0.05)) as http:
                    http.post("/v1/chat/completions", json=_body(True))
            else:
                with httpx.Client(base_url=live_server.url, timeout=60) as http, \
                        http.stream("POST", "/v1/chat/completions", json=_body(True)) as resp:
                    for n, _ in enumerate(resp.iter_lines()):
                        if n >= i:
                            break
        except httpx.ReadTimeout:
            pass
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    clients = 12
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    _assert_aborted(live_server, before, limit=clients * LONG // 4)
    # And the server still serves.
    with httpx.Client(base_url=live_server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={**_body(False), "max_tokens": 2})
        assert r.status_code == 200
