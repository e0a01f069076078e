"""The live-server fixtures (live_server, client, http, api_key) are in tests/conftest.py, shared with
tests/structured: one server per test session."""
