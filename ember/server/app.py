"""The FastAPI application: routes, auth, request ids, and an OpenAPI document that matches what is served."""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time, and the auth
# dependency's annotation refers to a local variable.
import hmac
import importlib.metadata
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from ember.engine.errors import EngineDeadError
from ember.server.config import ServerConfig
from ember.server.engine_client import EngineClient
from ember.server.errors import (
    UNAVAILABLE,
    APIError,
    ClientDisconnected,
    install_error_handlers,
    to_api_error,
)
from ember.server.limits import Admission
from ember.server.metrics import ServerMetrics
from ember.server.middleware import BodySizeLimitMiddleware, RequestContextMiddleware
from ember.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from ember.server.request_log import current_record
from ember.server.serving_chat import OpenAIServingChat
from ember.server.serving_completion import OpenAIServingCompletion
from ember.server.serving_tokenization import OpenAIServingTokenization
from ember.server.tracked_engine import TrackedEngine


def ember_version() -> str:
    try:
        return importlib.metadata.version("ember")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


@dataclass
class ServerState:
    """What the routes reach through `app.state.ember`. `engine` is None until the model has loaded."""

    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: EngineClient | None = None
    chat: OpenAIServingChat | None = None
    completion: OpenAIServingCompletion | None = None
    tokenization: OpenAIServingTokenization | None = None

    @property
    def served_model_names(self) -> list[str]:
        assert self.engine is not None
        return self.config.served_model_names or [self.engine.model_name]


def get_state(app: FastAPI) -> ServerState:
    state = app.state.ember
    assert isinstance(state, ServerState)
    return state


def attach_engine(app: FastAPI, engine: EngineClient) -> None:
    """Start serving requests with `engine` (until then every API route answers 503)."""
    state = get_state(app)
    cfg = state.config
    names = cfg.served_model_names or [engine.model_name]
    state.metrics.attach(names[0], engine.stats)
    engine = TrackedEngine(engine, state.metrics, names[0], Admission(cfg.max_in_flight), cfg.request_timeout_s)
    state.engine = engine
    state.chat = OpenAIServingChat(engine, names, tool_call_parser=cfg.tool_call_parser)
    state.completion = OpenAIServingCompletion(engine, names)
    state.tokenization = OpenAIServingTokenization(engine, names)


def _ready_state(request: Request) -> ServerState:
    state = get_state(request.app)
    if state.engine is None:
        raise APIError(503, "the model is still loading", UNAVAILABLE, code="model_loading")
    if state.engine.errored:
        raise to_api_error(EngineDeadError())
    return state


Ready = Annotated[ServerState, Depends(_ready_state)]


def _auth_dependency(keys: list[str]) -> Any:
    bearer = HTTPBearer(auto_error=False, description="The key given to `ember serve --api-key`.")
    encoded = [k.encode() for k in keys]

    Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]

    async def require_api_key(creds: Credentials) -> None:
        given = creds.credentials.encode() if creds is not None else b""
        # Compare against every key without stopping early, so timing does not reveal which prefix matched.
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(given, key)
        if not ok:
            message = "Incorrect API key provided." if creds is not None else (
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return Depends(require_api_key)


def _note_model(model: str | None) -> None:
    """The model name the client asked for, for the request's log line."""
    record = current_record()
    if record is not None:
        record.model = model


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
            413: "Request body too large", 429: "Queue full: retry after the Retry-After header's seconds",
            500: "Engine failure", 503: "Model still loading", 504: "Request timeout (--request-timeout)"}
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


def _stream_doc(chunk: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": "A JSON response, or with `stream: true` server-sent events: "
                                 f"`data: <{chunk}>` lines ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk}"}}}}}


def _api_router(config: ServerConfig) -> APIRouter:
    deps = [_auth_dependency(config.api_keys)] if config.api_keys else []
    errors = [400, 401, 404, 413, 500, 503] if config.api_keys else [400, 404, 413, 500, 503]
    router = APIRouter(dependencies=deps, responses=_error_responses(*errors))
    generation_errors = _error_responses(429, 504)

    @router.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def list_models(state: Ready) -> ModelList:
        """Every served model name; the first is canonical."""
        assert state.engine is not None
        root, max_len = state.engine.model_name, state.engine.max_model_len
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=max_len)
                               for name in state.served_model_names])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["OpenAI"])
    async def retrieve_model(model_id: str, state: Ready) -> ModelCard:
        assert state.engine is not None and state.chat is not None
        state.chat.resolve_model(model_id)
        return ModelCard(id=model_id, root=state.engine.model_name, max_model_len=state.engine.max_model_len)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["OpenAI"],
                 responses={**_stream_doc("ChatCompletionChunk"), **generation_errors})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: Ready) -> Any:
        assert state.chat is not None
        _note_model(body.model)
        return await state.chat.create_chat_completion(body, request)

    @router.post("/v1/completions", response_model=CompletionResponse, tags=["OpenAI"],
                 responses={**_stream_doc("CompletionChunk"), **generation_errors})
    async def create_completion(body: CompletionRequest, request: Request, state: Ready) -> Any:
        assert state.completion is not None
        _note_model(body.model)
        return await state.completion.create_completion(body, request)

    @router.post("/tokenize", response_model=TokenizeResponse, tags=["vLLM extensions"])
    async def tokenize(body: TokenizeRequest, state: Ready) -> TokenizeResponse:
        """Token ids of a prompt, or of messages rendered by the chat template."""
        assert state.tokenization is not None
        return state.tokenization.tokenize(body)

    @router.post("/detokenize", response_model=DetokenizeResponse, tags=["vLLM extensions"])
    async def detokenize(body: DetokenizeRequest, state: Ready) -> DetokenizeResponse:
        assert state.tokenization is not None
        return state.tokenization.detokenize(body)

    return router


def _open_router(config: ServerConfig) -> APIRouter:
    """/health, /metrics and /version: open to load balancers and scrapers unless the config protects them."""
    router = APIRouter(tags=["Server"])

    def deps(name: str) -> list[Any]:
        return [_auth_dependency(config.api_keys)] if config.api_keys and name not in config.public_endpoints else []

    @router.get("/health", dependencies=deps("health"), response_class=Response,
                responses={200: {"description": "Ready to serve (empty body)"},
                           503: {"model": ErrorResponse, "description": "Loading, or dead"}})
    async def health(request: Request) -> Response:
        """200 when ready; 503 while loading or once the engine has died (a supervisor should restart it)."""
        state = get_state(request.app)
        if state.engine is None:
            raise APIError(503, "the model is still loading", UNAVAILABLE, code="model_loading")
        if state.engine.errored:
            raise APIError(503, "the inference engine has stopped", UNAVAILABLE, code="engine_dead")
        return Response(status_code=200)

    @router.get("/version", response_model=VersionResponse, dependencies=deps("version"))
    async def version() -> VersionResponse:
        return VersionResponse(version=ember_version())

    @router.get("/metrics", dependencies=deps("metrics"), response_class=Response,
                responses={200: {"description": "Prometheus text format (vLLM's metric names)",
                                 "content": {"text/plain": {}}}})
    async def metrics(request: Request) -> Response:
        return get_state(request.app).metrics.response()

    return router


def _install_openapi(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body it validates; ember answers 400 (with an OpenAI error object)
    instead, so drop those, and add the streamed chunk schemas that the SSE responses refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        chunks = (("ChatCompletionChunk", ChatCompletionChunk), ("CompletionChunk", CompletionChunk))
        for name, model in chunks:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            components.update(js.pop("$defs", {}))
            components[name] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _client_gone(_: Request, __: Exception) -> Response:
    # 499 (nginx's "client closed request"): nobody reads it, but access logs show what happened.
    return Response(status_code=499)


def build_app(engine: EngineClient | None, config: ServerConfig) -> FastAPI:
    """The HTTP app. With `engine=None` it serves /health (503) and docs while the model loads; hand the
    engine over with `attach_engine`. The caller owns the engine's start and shutdown."""
    app = FastAPI(title="ember", version=ember_version(),
                  description="OpenAI-compatible inference server. Errors are OpenAI error objects "
                              "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
    state = ServerState(config)
    app.state.ember = state
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    # The last added runs first: request context (id, log line, HTTP metrics) around CORS around the body cap,
    # so that 413s and CORS preflights are logged and counted too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers, allow_credentials=config.allow_credentials)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics, log_requests=config.log_requests)
    app.include_router(_open_router(config))
    app.include_router(_api_router(config))
    _install_openapi(app)
    if engine is not None:
        attach_engine(app, engine)
    return app
