"""1,000 clients that hang up (before the first token or mid-stream) leave the engine idle with every KV block
free, and the server still serves."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx

from ember.config import EMBEDDED_MODEL

STORM = 1000
CONCURRENCY = 48  # enough to keep the engine batching; bounded so the test stays quick on two cores
MAX_TOKENS = 32  # each request would generate this many if nobody aborted it


def _request(port: int, path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps({"model": EMBEDDED_MODEL, **body, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "stream": True}).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    return head + data


def _requests(port: int) -> list[bytes]:
    # Short prompts: on a CPU the prefill of 500 chat templates alone would take most of a minute. One request
    # in ten is a chat, so the chat handler's abort path is in the storm too.
    completion = _request(port, "/v1/completions", {"prompt": "Once upon a time"})
    chat = _request(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    return [chat if i % 10 in (0, 1) else completion for i in range(STORM)]


def _aborted(http: httpx.Client) -> float:
    """vllm:request_success_total{finished_reason="abort"} on the main app."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _hang_up(port: int, raw: bytes, i: int, rng: random.Random) -> str:
    """Send one streamed request, then drop the connection: early for even i (at once, when the request has
    not reached the engine yet, or a little later, when it waits there for its first token), after the first
    event (a token exists) for odd i. Returns what happened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if i % 2 == 0:
            await asyncio.sleep(rng.choice((0.0, 0.005, 0.05, 0.2)))
            return "early"
        seen = b""
        while b"data: " not in seen:
            chunk = await asyncio.wait_for(reader.read(4096), 60)
            if not chunk:
                return "closed by server"
            seen += chunk
        return "mid-stream"
    finally:
        writer.transport.abort()  # a reset, as when a client process dies, not a polite close


def test_disconnect_storm_1000(live_server: Any, http: httpx.Client) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    raws = _requests(port)
    before = live_server.stats()
    aborted_before = _aborted(http)
    rng = random.Random(0)

    async def storm() -> list[str]:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> str:
            async with sem:
                return await _hang_up(port, raws[i], i, rng)

        return await asyncio.gather(*(one(i) for i in range(STORM)))

    start = time.monotonic()
    outcomes = asyncio.run(storm())
    elapsed = time.monotonic() - start
    assert outcomes.count("mid-stream") == STORM // 2, outcomes
    s = live_server.wait_idle(timeout=60)
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert s["num_free_blocks"] == s["num_total_blocks"], s
    generated = s["generation_tokens_total"] - before["generation_tokens_total"]
    # Aborts stopped the work: far fewer tokens than the storm would have generated unaborted.
    assert generated < STORM * MAX_TOKENS // 4, (generated, elapsed)
    # Every mid-stream request was aborted in the engine, and so were early ones that had reached it.
    aborted = _aborted(http) - aborted_before
    assert aborted > STORM // 2, aborted
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"model": "llm", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
