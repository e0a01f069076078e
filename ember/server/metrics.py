"""Prometheus metrics at /metrics, under vLLM's names and labels so that dashboards built for vLLM work.

Engine state (running, waiting, KV usage, token and cache counters) is read from `engine.stats()` when
Prometheus scrapes, so the step loop pays nothing for it. Per-request latencies are observed by the server as it
relays outputs (`TrackedEngine`), which is also what a client experiences. Each app has its own registry: two
apps in one process (tests run a second, keyed app on the same engine) must not collide in a global one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so histogram_quantile panels read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

StatsSource = Callable[[], dict[str, Any] | None]

# engine.stats() key -> (vLLM counter name without _total, help)
_ENGINE_COUNTERS = {
    "prompt_tokens_total": ("vllm:prompt_tokens", "Prefill tokens processed."),
    "generation_tokens_total": ("vllm:generation_tokens", "Generation tokens processed."),
    "num_preemptions": ("vllm:num_preemptions", "Cumulative number of preemptions from the engine."),
    "prefix_cache_queries": ("vllm:prefix_cache_queries",
                             "Prefix cache queries, in terms of number of queried tokens."),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
}
# engine.stats() key -> (vLLM gauge name, help)
_ENGINE_GAUGES = {
    "num_running": ("vllm:num_requests_running", "Number of sequences in model execution batches."),
    "num_waiting": ("vllm:num_requests_waiting", "Number of sequences waiting to be processed."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
}


class EngineStatsCollector(Collector):
    """Engine gauges and counters, read at scrape time. Nothing is reported while the model loads."""

    def __init__(self, source: StatsSource, model_name: Callable[[], str | None]) -> None:
        self.source = source
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats, name = self.source(), self.model_name()
        if stats is None or name is None:
            return
        for key, (metric, doc) in _ENGINE_GAUGES.items():
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], float(stats[key]))
            yield g
        for key, (metric, doc) in _ENGINE_COUNTERS.items():
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], float(stats[key]))
            yield c


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name: str | None = None  # set once the engine is attached
        self._stats: StatsSource = lambda: None
        self.registry.register(EngineStatsCollector(lambda: self._stats(), lambda: self.model_name))
        r = self.registry
        self.request_success = Counter("vllm:request_success", "Count of finished requests (sequences).",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", ["model_name"],
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent waiting in the queue before the first step.",
                                    ["model_name"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("ember:requests_rejected", "Requests refused at once because the queue was full.",
                                ["model_name"], registry=r)
        self.http_requests = Counter("http_requests", "HTTP requests by route template, method and status.",
                                     ["method", "handler", "status"], registry=r)
        self.http_duration = Histogram("http_request_duration_seconds",
                                       "HTTP request duration by route template (streams: until the last byte).",
                                       ["method", "handler"], buckets=HTTP_BUCKETS, registry=r)

    def attach(self, model_name: str, stats: StatsSource) -> None:
        self.model_name = model_name
        self._stats = stats

    def observe_http(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_duration.labels(method, handler).observe(seconds)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
