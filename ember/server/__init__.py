"""The OpenAI-compatible HTTP server: `build_app` makes the ASGI app; `launcher.EmberServer` runs it.

The names below are imported on first use: `ember chat` and `ember smoke` import ember.server.config (through
ember.cli) and need not pay for the app, which imports FastAPI and torch (~5 s on the GPU machine).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.server.app import attach_engine, build_app
    from ember.server.config import ServerConfig

__all__ = ["ServerConfig", "attach_engine", "build_app"]


def __getattr__(name: str) -> Any:
    if name in ("attach_engine", "build_app"):
        from ember.server import app

        return getattr(app, name)
    if name == "ServerConfig":
        from ember.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'ember.server' has no attribute {name!r}")
