"""Every error of the HTTP door becomes an HTTP status and OpenAI's error JSON here, in one place:

    {"error": {"message": "input[1]: must not be empty ...", "type": "invalid_request_error",
               "param": "input[1]", "code": "invalid_argument"}}

Domain errors keep their gRPC code (lower case, in `code`), so a bad input reads the same on both doors;
the status follows google.rpc.Code's documented HTTP mapping. Request-shape errors from pydantic, malformed
JSON and unknown routes come out in the same shape.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ..errors import InputTooLargeError, QueueFullError, ScholarEmbedError, UnavailableError

log = logging.getLogger(__name__)

# google.rpc.Code's HTTP mapping (googleapis/google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# The gRPC code an HTTP-only failure (body limit, unknown route, ...) reports in `code` and in metrics.
GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# OpenAI's `type` of an error, by status class.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
WARMUP_RETRY_AFTER_S = 1
# Where a handled error leaves its gRPC code in the ASGI scope, for the metrics middleware.
GRPC_CODE_STATE_KEY = "scholarembed.grpc_code"


class MalformedJsonError(HTTPException):
    """A body that is not JSON: a 400 without a field to blame, the same words from every route."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(400, f"malformed JSON at character {position}: {reason}")


class RequestTooLargeError(HTTPException):
    """The body is over --http-max-body-bytes. An HTTPException, so that FastAPI's body reader passes it on
    instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes (--http-max-body-bytes)")


def error_response(
    status: int, message: str, *, param: str | None = None, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def grpc_code(error: BaseException) -> grpc.StatusCode:
    """The outcome of a failed call as a gRPC code, for `code` and for the metrics' code label."""
    if isinstance(error, ScholarEmbedError):
        return error.code
    if isinstance(error, RequestValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, HTTPException):
        return GRPC_CODE.get(error.status_code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.INTERNAL


def domain_error_response(error: ScholarEmbedError) -> JSONResponse:
    headers = None
    if isinstance(error, QueueFullError):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    elif isinstance(error, UnavailableError):
        headers = {"Retry-After": str(WARMUP_RETRY_AFTER_S)}
    # One input too long for the accelerator even alone: retrying will not help, unlike a full queue.
    status = 413 if isinstance(error, InputTooLargeError) else HTTP_STATUS.get(error.code, 500)
    return error_response(
        status,
        str(error),
        param=getattr(error, "field", None),  # InvalidArgumentError's, or another error's that names one
        code=error.code.name.lower(),
        headers=headers,
    )


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint, as `field: message`; malformed JSON says where it broke."""
    first: dict[str, Any] = error.errors()[0]
    if first.get("type") == "json_invalid":
        malformed = MalformedJsonError(first["loc"][-1], first.get("ctx", {}).get("error", "JSON decode error"))
        return error_response(400, malformed.detail, code="invalid_argument")
    param = _field_path(first.get("loc", ()))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return error_response(
        400, f"{param}: {message}" if param else message, param=param or None, code="invalid_argument"
    )


def _field_path(location: tuple[Any, ...]) -> str:
    """('body', 'input', 2) -> 'input[2]'. pydantic also puts union branch names ('str', 'list[str]') in the
    path; they are not fields, so they go."""
    path = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in ("str", "int", "bool", "float"):
            continue
        else:
            path += f".{part}" if path else part
    return path


def install(app: FastAPI) -> None:
    """Make every error of `app` an OpenAI error body."""

    def record(request: Request, error: BaseException) -> None:
        request.scope.setdefault("state", {})[GRPC_CODE_STATE_KEY] = grpc_code(error)

    @app.exception_handler(ScholarEmbedError)
    async def on_domain_error(request: Request, error: ScholarEmbedError) -> JSONResponse:
        record(request, error)
        return domain_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        record(request, error)
        return validation_error_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        record(request, error)
        return error_response(
            error.status_code,
            str(error.detail),
            code=grpc_code(error).name.lower(),
            headers=dict(error.headers) if error.headers else None,
        )

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=error)
        return error_response(500, f"internal error: {type(error).__name__}", code="internal")
