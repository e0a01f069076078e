"""HTTP server settings (the engine's are `ember.config.EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Routes outside the OpenAI API that may stay open when API keys are set: load balancers and Prometheus
# scrapers usually carry no key. The docs (/docs, /openapi.json) are always open.
PUBLIC_ENDPOINTS = ("health", "metrics", "version")
# `--tool-call-parser` values: "auto" (read the format off the chat template) or a name from
# ember.structured.tool_parsers.TOOL_PARSERS. Spelled out here because importing ember.structured pulls in
# llguidance, too heavy for parsing the command line; a test keeps the two in step.
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line and `EmberServer.url` tell which)
    # The names clients may use in `model`; the first is canonical. Empty: the engine's model name.
    served_model_names: list[str] = field(default_factory=list)
    # Bearer keys accepted on the API routes; empty: no authentication.
    api_keys: list[str] = field(default_factory=list)
    # Which of PUBLIC_ENDPOINTS answer without a key when api_keys is set.
    public_endpoints: list[str] = field(default_factory=lambda: list(PUBLIC_ENDPOINTS))
    # CORS, as vLLM's --allowed-origins/--allowed-methods/--allowed-headers/--allow-credentials.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    # Backpressure. At most max_num_seqs + max_queue_len engine sequences in flight (a request counts n per
    # prompt); past that a request is refused at once with 429. None: no cap (requests queue in the engine).
    max_num_seqs: int | None = None
    max_queue_len: int | None = None
    request_timeout_s: float | None = None  # None: a request may run as long as it needs
    max_request_body_bytes: int = 16 * 2**20
    # SIGTERM: stop accepting, give in-flight requests this long to finish, then cancel them.
    graceful_shutdown_timeout_s: float = 30.0
    log_requests: bool = True  # one structured line per API request on the `ember.requests` logger
    uvicorn_log_level: str = "info"
    access_log: bool = True
    # How tool_choice "auto" reads calls out of chat output: "auto" detects the format from the chat template.
    tool_call_parser: str = "auto"
    # The engine's step loop in a process of its own (ember/engine/process_engine.py), or in the server's.
    # None: in its own where the engine runs on a GPU (launcher.use_engine_process says why).
    engine_process: bool | None = None

    def __post_init__(self) -> None:
        # Fail at construction, before the model loads, rather than with a 500 on the first request with tools.
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {self.tool_call_parser!r}; "
                             f"known: {', '.join(TOOL_CALL_PARSERS)}")

    @property
    def max_in_flight(self) -> int | None:
        if self.max_queue_len is None:
            return None
        return (self.max_num_seqs or 0) + self.max_queue_len
