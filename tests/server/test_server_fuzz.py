"""Fuzz every route of /openapi.json with schemathesis against the live server: no 5xx, responses match the
documented schemas, and the server is healthy and idle afterwards. Bounded: a few hundred cases in all, and
generation lengths clamped so that a valid request costs a few tokens on a CPU."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

EXAMPLES_PER_OPERATION = 30  # ~9 operations: about 270 cases
MAX_TOKENS = 4
MAX_N = 2


def _clamp(case: Any) -> None:
    """Keep valid generation requests short: the fuzzer is after the server's handling of input, and 128 choices
    of 1,000 tokens each would take minutes on a CPU. Values of the wrong type are left for the server to refuse."""
    body = case.body
    if not isinstance(body, dict) or case.path not in ("/v1/chat/completions", "/v1/completions"):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_N:
        body["n"] = MAX_N
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 4 and not all(isinstance(t, int) for t in prompt):
        body["prompt"] = prompt[:4]  # a batch of many prompts: a few are enough


def test_openapi_fuzz(live_server: Any) -> None:
    # Driven from one test rather than schemathesis' pytest plugin, whose collection hooks do not work with
    # this pytest; the server is a session fixture, so the schema can only be loaded inside a test anyway.
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    cases = 0

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            nonlocal cases
            cases += 1
            _clamp(case)
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        fuzz()
    assert cases >= 100  # the bound above is a ceiling; the fuzzer must actually have run


def test_healthy_after_fuzz(http: httpx.Client, live_server: Any) -> None:
    assert http.get("/health").status_code == 200
    s = live_server.wait_idle()
    assert s["num_running"] == 0 and s["num_free_blocks"] == s["num_total_blocks"]
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
