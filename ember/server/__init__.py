"""The OpenAI-compatible HTTP server: `build_app` makes the ASGI app; `launcher.EmberServer` runs it."""

from ember.server.app import attach_engine, build_app
from ember.server.config import ServerConfig

__all__ = ["ServerConfig", "attach_engine", "build_app"]
