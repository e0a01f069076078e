"""API keys on the open endpoints (configurable), CORS as vLLM's flags set it, and the flags themselves."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from ember.cli import build_parser, server_config_from_args
from ember.server.app import build_app
from ember.server.config import ServerConfig

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def _client(**config: Any) -> TestClient:
    # No engine: these checks all happen before a request could reach the model.
    return TestClient(build_app(None, ServerConfig(**config)))


def test_health_metrics_version_open_by_default_with_keys() -> None:
    with _client(api_keys=["k1"]) as c:
        assert c.get("/health").status_code == 503  # open (and loading), not 401
        assert c.get("/metrics").status_code == 200
        assert c.get("/version").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_protected_endpoints_need_a_key() -> None:
    with _client(api_keys=["k1", "k2"], public_endpoints=["version"]) as c:
        for path in ("/health", "/metrics"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/health", headers={"Authorization": "Bearer k2"}).status_code == 503
        assert c.get("/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert c.get("/version").status_code == 200
        assert c.get("/docs").status_code == 200  # the docs stay open


def test_cors_default_allows_any_origin_even_with_keys() -> None:
    with _client(api_keys=["k"]) as c:
        # A browser's preflight carries no Authorization header; it must not be refused with 401.
        r = c.options("/v1/chat/completions", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "*"
        r = c.get("/version", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "*"


def test_cors_restricted() -> None:
    with _client(allowed_origins=["https://a.example"], allowed_methods=["POST"],
                 allowed_headers=["authorization", "content-type"], allow_credentials=True) as c:
        r = c.options("/v1/chat/completions", headers={"Origin": "https://a.example", **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.options("/v1/chat/completions", headers={"Origin": "https://a.example",
                                                       "Access-Control-Request-Method": "DELETE"})
        assert r.status_code == 400
        r = c.get("/version", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def _config(argv: list[str]) -> ServerConfig:
    return server_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_map_to_server_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    d = _config([])
    assert d.api_keys == ["from-env"]
    assert d.public_endpoints == ["health", "metrics", "version"]
    assert d.allowed_origins == d.allowed_methods == d.allowed_headers == ["*"] and not d.allow_credentials
    assert d.max_queue_len is None and d.max_in_flight is None and d.request_timeout_s is None
    assert d.max_request_body_bytes == 16 * 2**20 and d.log_requests
    c = _config(["--api-key", "a", "--api-key", "b", "--public-endpoints", "health",
                 "--allowed-origins", '["https://a.example", "https://b.example"]',
                 "--allowed-methods", "GET,POST", "--allowed-headers", "authorization", "--allow-credentials",
                 "--max-num-seqs", "8", "--max-queue-len", "0", "--request-timeout", "2.5",
                 "--max-request-body-bytes", "1MiB", "--graceful-shutdown-timeout", "7",
                 "--disable-log-requests"])
    assert c.api_keys == ["a", "b"]  # the flags win over the environment
    assert c.public_endpoints == ["health"]
    assert c.allowed_origins == ["https://a.example", "https://b.example"]
    assert c.allowed_methods == ["GET", "POST"] and c.allowed_headers == ["authorization"]
    assert c.allow_credentials
    assert c.max_in_flight == 8 and c.request_timeout_s == 2.5 and c.max_request_body_bytes == 2**20
    assert c.graceful_shutdown_timeout_s == 7 and not c.log_requests
    assert _config(["--public-endpoints"]).public_endpoints == []


@pytest.mark.parametrize("argv", [
    ["--max-queue-len", "-1"],
    ["--request-timeout", "0"],
    ["--request-timeout", "nan"],
    ["--allowed-origins", '["a", 1]'],
    ["--allowed-origins", "[oops"],
    ["--public-endpoints", "docs"],
    ["--max-request-body-bytes", "lots"],
])
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *argv])
    assert exc.value.code == 2
