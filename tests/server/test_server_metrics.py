"""/metrics: vLLM's metric names with a model_name label, HTTP counts and durations, values that follow traffic."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from ember.config import EMBEDDED_MODEL

LABEL = {"model_name": EMBEDDED_MODEL}  # the canonical (first) served name, whichever alias a client uses
HELLO = [{"role": "user", "content": "Say hello."}]

ENGINE_GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
ENGINE_COUNTERS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                   "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset({**LABEL, **labels}.items())), 0.0)


def http_value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_vllm_metric_names_with_model_label(http: httpx.Client) -> None:
    samples = scrape(http)
    names = {name for name, labels in samples if dict(labels).get("model_name") == EMBEDDED_MODEL}
    for name in ENGINE_GAUGES + ENGINE_COUNTERS:
        assert name in names, name
    # Histograms appear once a request has been observed; any earlier test in the session may have been it.
    http.post("/v1/completions", json={"model": "llm", "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    names = {name for name, _ in scrape(http)}
    for h in HISTOGRAMS:
        assert {h + "_bucket", h + "_sum", h + "_count"} <= names, h
    assert "vllm:request_success_total" in names
    assert "http_requests_total" in names and "http_request_duration_seconds_count" in names


def test_values_move_with_requests(http: httpx.Client, client: openai.OpenAI) -> None:
    before = scrape(http)
    r = client.chat.completions.create(model="llm", messages=HELLO, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=EMBEDDED_MODEL, messages=HELLO, max_tokens=4, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert r.usage is not None
    assert delta("vllm:prompt_tokens_total") == 2 * r.usage.prompt_tokens  # the same prompt twice
    assert delta("vllm:generation_tokens_total") == 5 + 4
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:request_queue_time_seconds_count") == 2
    # One gap between consecutive tokens: 4 in the first request, 3 in the second.
    assert delta("vllm:inter_token_latency_seconds_count") == 4 + 3
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    # The second request's prompt is the first one's: its full blocks come from the prefix cache.
    assert delta("vllm:prefix_cache_hits_total") > 0
    assert delta("vllm:prefix_cache_queries_total") >= delta("vllm:prefix_cache_hits_total")
    chat = {"method": "POST", "handler": "/v1/chat/completions", "status": "200"}
    assert http_value(after, "http_requests_total", **chat) - http_value(before, "http_requests_total", **chat) == 2
    timed = {"method": "POST", "handler": "/v1/chat/completions"}
    assert (http_value(after, "http_request_duration_seconds_count", **timed)
            - http_value(before, "http_request_duration_seconds_count", **timed)) == 2


def test_gauges_follow_a_running_request(http: httpx.Client, live_server: Any) -> None:
    body = {"model": "llm", "messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True}
    before = scrape(http)
    with httpx.Client(base_url=live_server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        during = scrape(http)
        assert value(during, "vllm:num_requests_running") == 1
        assert value(during, "vllm:kv_cache_usage_perc") > 0
    live_server.wait_idle()
    after = scrape(http)
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    # The client hung up: the request counts as aborted.
    aborted = "vllm:request_success_total"
    assert value(after, aborted, finished_reason="abort") - value(before, aborted, finished_reason="abort") == 1


def test_http_errors_are_counted_by_route_template(http: httpx.Client) -> None:
    before = scrape(http)
    assert http.get("/v1/models/no-such-model").status_code == 404
    assert http.get("/not/a/route").status_code == 404
    time.sleep(0.05)  # the count is taken after the response has gone out
    after = scrape(http)
    model = {"method": "GET", "handler": "/v1/models/{model_id:path}", "status": "404"}
    unknown = {"method": "GET", "handler": "none", "status": "404"}
    for labels in (model, unknown):
        assert http_value(after, "http_requests_total", **labels) - http_value(before, "http_requests_total",
                                                                               **labels) == 1
    assert not any("/not/a/route" in str(labels) for _, labels in after)  # raw paths never become labels
