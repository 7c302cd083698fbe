"""The HTTP door's FastAPI app: OpenAI's /v1/embeddings and /v1/models, /v1/search mirroring the Search RPC,
and health probes, over the shared `TextEmbedder` and `Searcher`.

Each route converts its JSON into a `scholarembed.v1` message, calls the shared code (validation, prompts,
batching, the index: nothing of it is repeated here) and converts the answer back. /v1/embeddings speaks
OpenAI's schema (pydantic models in `schemas`); /v1/search speaks the proto3 JSON mapping of SearchRequest
and SearchResponse (`protojson`), so every field of the proto reaches HTTP, schema included, without a
hand-kept copy. Errors become OpenAI's error JSON in `errors`. Three pure-ASGI middlewares, outermost
first: metrics (with the door label), the body limit (413), bearer tokens (401).

A request with no input_type and no `:query`/`:passage` model alias is refused, as on every other door:
the model is asymmetric, and a query embedded with the passage prompt is silently worse. Clients that
cannot send input_type (the openai SDK's create(), LangChain) name the alias as their model. An operator
whose clients can do neither opts in to a default with --http-default-input-type.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scholarembed.v1 import embedding_pb2, search_pb2

from .. import logs
from ..config import ServerConfig
from ..embedder import TextEmbedder
from ..errors import InvalidArgumentError, ScholarEmbedError, SearchDisabledError, UnavailableError
from ..metrics import Metrics
from ..names import INPUT_TYPE_NAMES, named_embed_request
from ..searcher import Searcher
from ..security import bearer_token_accepted
from . import errors, protojson
from .schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)

MODEL_ALIASES = ("query", "passage")  # `<model>:query`, `<model>:passage`
# The RPC each route stands for, as the metrics' rpc label: one dashboard shows both doors.
ROUTE_RPCS = {"/v1/embeddings": "Embed", "/v1/search": "Search", "/v1/models": "GetModelInfo"}
# Probes and the API description: open without a token when --auth-open-probes, as gRPC health and reflection.
OPEN_PATHS = ("/health", "/health/live", "/health/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect")
# The search page: one static file that holds no data (its searches carry the token), so always open.
SEARCH_PAGE = Path(__file__).with_name("search.html")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "A field is wrong (`param` names it), or malformed JSON",
        401: "Missing or wrong bearer token",
        404: "Unknown model or collection",
        413: "Request body over the server's limit",
        429: "Queue full: retry after the Retry-After header's seconds",
        503: "Warming up or draining: retry after Retry-After, or elsewhere",
    }.items()
}


class ModelNotFoundError(ScholarEmbedError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str, served: str) -> None:
        super().__init__(f"model: {model!r} is not served here; use {served!r} (see GET /v1/models)")
        self.field = "model"


class DoorState:
    """What the routes need to know beyond the shared parts: whether the door is draining."""

    def __init__(self) -> None:
        self.draining = False


def create_app(
    config: ServerConfig, embedder: TextEmbedder, searcher: Searcher | None, metrics: Metrics, state: DoorState
) -> FastAPI:
    engine = embedder.engine
    model_id = engine.model_id
    default_input_type = _check_input_type(config.http_default_input_type)
    tokens = [token.encode() for token in config.auth_tokens()]
    auth = [Middleware(BearerTokenMiddleware, tokens=tokens, open_probes=config.auth_open_probes)] if tokens else []
    app = FastAPI(
        title="scholarembed HTTP API",
        version="1",
        description="OpenAI-compatible embeddings and JSON search over the same engine, batcher, limits "
        "and auth as the scholarembed.v1 gRPC services. Every error has OpenAI's error JSON.",
        middleware=[
            Middleware(MetricsMiddleware, metrics=metrics),
            Middleware(BodyLimitMiddleware, max_body_bytes=config.http_max_body_bytes),
            *auth,
        ],
    )
    errors.install(app)

    def check_serving() -> None:
        if state.draining:
            raise UnavailableError("server is draining: retry on another replica")

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES)
    async def create_embeddings(body: EmbeddingsRequest) -> Response:
        """Embed texts (OpenAI's embeddings API). The prompt comes from `input_type`, else from the
        `:query`/`:passage` model alias; a request with neither is refused (400) unless the server sets
        --http-default-input-type."""
        check_serving()
        single = isinstance(body.input, str)
        texts = [body.input] if single else body.input
        try:
            request = named_embed_request(
                texts,
                input_type=_input_type(body, model_id, default_input_type),
                titles=body.titles or [],
                dimensions=body.dimensions or 0,
                truncation=body.truncation,
            )
            response = await embedder.embed_request(request, wait=False)
        except InvalidArgumentError as error:
            raise _as_input_field(error, single) from error
        return _embeddings_json(response, body.encoding_format)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        """The served model, and its `:query` and `:passage` aliases."""
        return ModelList(
            data=[
                ModelCard(
                    id=name,
                    dimensions=engine.dimensions,
                    matryoshka_dimensions=list(engine.matryoshka_dims),
                    max_tokens=engine.max_tokens,
                    max_texts_per_request=config.max_texts_per_request,
                )
                for name in (model_id, *(f"{model_id}:{alias}" for alias in MODEL_ALIASES))
            ]
        )

    search_errors = {**ERROR_RESPONSES, 501: {"model": ErrorResponse, "description": "No index on this server"}}
    search_request, search_response = search_pb2.SearchRequest, search_pb2.SearchResponse

    @app.post(
        "/v1/search",
        response_class=Response,
        responses={
            200: {
                "description": "scholarembed.v1.SearchResponse as JSON, with the proto's field names",
                "content": {"application/json": {"schema": protojson.reference(search_response.DESCRIPTOR)}},
            },
            **search_errors,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": protojson.reference(search_request.DESCRIPTOR)}},
            }
        },
    )
    async def search(request: Request) -> Response:
        """Search a collection: scholarembed.v1.SearchRequest in the proto3 JSON mapping (the proto's field
        names or their lowerCamelCase JSON names; enums by name, e.g. `"mode": "SEARCH_MODE_HYBRID"`), with
        the Search RPC's validation and errors; an unknown field is a 400 naming it."""
        body = await request.body()  # first, as FastAPI reads the other routes' bodies before they run
        check_serving()
        if searcher is None:
            raise SearchDisabledError()
        message = protojson.parse(body, search_request)
        response = await searcher.search(message, wait=False)
        return Response(protojson.render(response), media_type="application/json")

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the schemas of the messages /v1/search speaks, made from the proto."""
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            components.update(protojson.json_schemas(search_request.DESCRIPTOR, search_response.DESCRIPTOR))
        return app.openapi_schema  # type: ignore[return-value]  # set by FastAPI.openapi

    app.openapi = openapi  # type: ignore[method-assign]

    search_page = SEARCH_PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        """The search page: a query box over POST /v1/search, for people."""
        return HTMLResponse(search_page)

    @app.get("/health/live", response_model=HealthStatus)
    async def live() -> HealthStatus:
        """Liveness: the process serves requests (the model may still be warming up)."""
        return HealthStatus(status="alive")

    @app.get("/health/ready", response_model=HealthStatus, responses={503: ERROR_RESPONSES[503]})
    @app.get("/health", response_model=HealthStatus, responses={503: ERROR_RESPONSES[503]})
    async def ready() -> HealthStatus:
        """Readiness: 200 once the model is warm, 503 while warming up or draining, or once broken."""
        check_serving()
        embedder.serving.check()  # the process's state: warming up, serving, or broken (with the cause)
        return HealthStatus(status="ready")

    return app


def _check_input_type(name: str | None) -> str | None:
    if name is not None and name not in INPUT_TYPE_NAMES:
        raise ValueError(f"--http-default-input-type {name!r}: use one of {', '.join(INPUT_TYPE_NAMES)}")
    return name


def _input_type(body: EmbeddingsRequest, model_id: str, default: str | None) -> str:
    """input_type, else the model alias's suffix, else the server's opt-in default; a contradiction is a
    400, and so is none of them."""
    alias = None
    if body.model is not None and body.model != model_id:
        base, _, alias = body.model.rpartition(":")
        if base != model_id or alias not in MODEL_ALIASES:
            raise ModelNotFoundError(body.model, model_id)
    if body.input_type is not None:
        if alias is not None and alias != body.input_type:
            raise InvalidArgumentError(
                "input_type", f"{body.input_type!r} contradicts the model alias {body.model!r}; send one of them"
            )
        return body.input_type
    if alias is not None:
        return alias
    if default is None:
        raise InvalidArgumentError(
            "input_type",
            "required: send input_type (query, passage or raw), or name the model "
            f"{model_id + ':query'!r} or {model_id + ':passage'!r} (for clients that cannot send input_type, "
            "such as the openai SDK or LangChain); the model is asymmetric, so there is no default",
        )
    return default


def _as_input_field(error: InvalidArgumentError, single: bool) -> InvalidArgumentError:
    """The shared validation names EmbedRequest's fields; this door's request calls `texts` `input`."""
    if error.field == "texts" or error.field.startswith("texts["):
        field = "input" if single else "input" + error.field.removeprefix("texts")
        return InvalidArgumentError(field, error.description)
    return error


def _embeddings_json(response: embedding_pb2.EmbedResponse, encoding_format: str) -> Response:
    """Serialised by orjson rather than through pydantic or json: floats are the hot path, and orjson
    writes float32 arrays directly, in float32's shortest exact form (half the bytes, ~15x faster than
    json.dumps on 64 x 768). The shape is EmbeddingsResponse's, as the OpenAPI document says."""
    rows = [embedding.data for embedding in response.embeddings]
    vectors: Sequence[Any]
    if encoding_format == "base64":
        vectors = [base64.b64encode(row).decode("ascii") for row in rows]  # already little-endian float32
    else:
        vectors = np.frombuffer(b"".join(rows), dtype="<f4").reshape(len(rows), response.dimensions)
    usage = EmbeddingsUsage(prompt_tokens=response.usage.total_tokens, total_tokens=response.usage.total_tokens)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": vector} for index, vector in enumerate(vectors)],
        "model": response.model,
        "usage": usage.model_dump(),
    }
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class MetricsMiddleware:
    """Time each API call in the shared request-duration histogram with door="http", under its request id
    (x-request-id, or a new one). The outcome is the gRPC code of the error handled, so both doors count
    the same failures alike."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rpc = ROUTE_RPCS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if rpc is None:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The caller gets the request id back (its own x-request-id, or the one made up for it).
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[logs.REQUEST_ID_HEADER] = logs.request_id.get()
            await send(message)

        with self.metrics.track(rpc, None, door="http", metadata=Headers(scope=scope).items()) as outcome:
            try:
                await self.app(scope, receive, send_and_see)
            except Exception:
                outcome.code = grpc.StatusCode.INTERNAL
                raise
            if status >= 400:
                outcome.code = scope.get("state", {}).get(errors.GRPC_CODE_STATE_KEY) or errors.GRPC_CODE.get(
                    status, grpc.StatusCode.UNKNOWN
                )


class BodyLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, or as soon as a chunked body passes it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = errors.error_response(
                413, str(errors.RequestTooLargeError(limit).detail), code="resource_exhausted"
            )
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.RequestTooLargeError(limit)
            return message

        await self.app(scope, receive_within_limit, send)


class BearerTokenMiddleware:
    """401 unless `Authorization: Bearer <token>` carries one of the tokens the gRPC port accepts."""

    def __init__(self, app: ASGIApp, tokens: Sequence[bytes], open_probes: bool) -> None:
        self.app = app
        self.tokens = tokens
        self.open_probes = open_probes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path == "/" or (self.open_probes and path in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        if not bearer_token_accepted(Headers(scope=scope).get("authorization", ""), self.tokens):
            response = errors.error_response(
                401,
                "missing or invalid bearer token (header 'Authorization: Bearer <token>')",
                code="unauthenticated",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
