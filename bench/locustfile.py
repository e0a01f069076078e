"""Load test with locust (the recipe's load tester) against a running `ember serve`.

    ember serve --port 8000 &
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 2m

Users send a mix of short chats (plain and streamed) and completions. Streams count as failures unless they
end with `data: [DONE]` and carry no error event. Set EMBER_API_KEY if the server requires a key, and
EMBER_MODEL to pick a served name (default: the server's first). Loopback hosts only, unless
EMBER_LOCUST_ALLOW_REMOTE=1: a load test pointed at someone else's server by mistake is a denial of service.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any
from urllib.parse import urlparse

from locust import HttpUser, between, events, task

CHATS = ["Say hello.", "What is the capital of France?", "Write a haiku about rain.", "Count to ten."]
PROMPTS = ["Once upon a time", "The quick brown fox", "def fibonacci(n):"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@events.test_start.add_listener
def _loopback_only(environment: Any, **_: Any) -> None:
    host = urlparse(environment.host or "").hostname
    if host not in LOOPBACK and os.environ.get("EMBER_LOCUST_ALLOW_REMOTE") != "1":
        raise SystemExit(f"refusing to load-test {environment.host!r}: not a loopback address "
                         "(set EMBER_LOCUST_ALLOW_REMOTE=1 if this is your server)")


class EmberUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        key = os.environ.get("EMBER_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = os.environ.get("EMBER_MODEL") or self.client.get("/v1/models").json()["data"][0]["id"]

    @task(4)
    def chat(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": random.choice(CHATS)}],
                "max_tokens": 32}
        with self.client.post("/v1/chat/completions", json=body, catch_response=True, name="chat") as r:
            if r.status_code != 200 or not r.json()["choices"]:
                r.failure(f"status {r.status_code}: {r.text[:200]}")

    @task(3)
    def chat_stream(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": random.choice(CHATS)}],
                "max_tokens": 32, "stream": True}
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True,
                              name="chat stream") as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
                return
            done, first = False, None
            for raw in r.iter_lines():
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - start
                if line == "data: [DONE]":
                    done = True
                elif "error" in json.loads(line[6:]):
                    r.failure(f"error event: {line[:200]}")
                    return
            if not done:
                r.failure("the stream ended without [DONE]")
                return
            if first is not None:  # time to first token, as its own row in locust's table
                events.request.fire(request_type="TTFT", name="chat stream", response_time=first * 1000,
                                    response_length=0, exception=None, context={})

    @task(3)
    def completion(self) -> None:
        body = {"model": self.model, "prompt": random.choice(PROMPTS), "max_tokens": 24}
        with self.client.post("/v1/completions", json=body, catch_response=True, name="completion") as r:
            if r.status_code != 200 or not r.json()["choices"]:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
