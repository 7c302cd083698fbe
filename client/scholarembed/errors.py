"""Exceptions raised by the client, one per gRPC status family that callers handle differently."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


# The metadata key under which the server sends back the id its log lines carry for the call.
REQUEST_ID_HEADER = "x-request-id"


class ScholarEmbedError(Exception):
    """Base of all client errors. `code` is the gRPC status code; `field_violations` name bad fields.

    `request_id` is a stream message's own id (the message that failed); `server_request_id` is the
    call's id in the server's logs (its `x-request-id` trailer), which a failed call's message names too.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
        request_id: str | None = None,
        server_request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field_violations = field_violations
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.server_request_id = server_request_id


class InvalidArgumentError(ScholarEmbedError):
    """The request was wrong (INVALID_ARGUMENT); see field_violations. Retrying will not help."""


class NotFoundError(ScholarEmbedError):
    """NOT_FOUND."""


class ResourceExhaustedError(ScholarEmbedError):
    """The server is busy or the message too large (RESOURCE_EXHAUSTED); retry_after_s hints when to retry."""


class UnavailableError(ScholarEmbedError):
    """The server is down, starting or draining (UNAVAILABLE); retry, possibly elsewhere."""


class DeadlineExceededError(ScholarEmbedError):
    """The call's timeout passed (DEADLINE_EXCEEDED)."""


class AuthenticationError(ScholarEmbedError):
    """Missing or wrong credentials (UNAUTHENTICATED or PERMISSION_DENIED)."""


class InternalError(ScholarEmbedError):
    """A server-side failure (INTERNAL, UNKNOWN, ...)."""


_CLASSES: dict[grpc.StatusCode, type[ScholarEmbedError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_status(
    status: status_pb2.Status, request_id: str | None = None, server_request_id: str | None = None
) -> ScholarEmbedError:
    """Build the typed exception for a google.rpc.Status (trailers of a call, or an in-band stream error)."""
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    error_class = _CLASSES.get(code, InternalError)
    prefix = f"[{request_id}] " if request_id else ""
    suffix = f" (server request id {server_request_id})" if server_request_id else ""
    return error_class(
        f"{prefix}{code.name}: {status.message}{suffix}",
        code=code,
        field_violations=tuple(violations),
        retry_after_s=retry_after,
        request_id=request_id,
        server_request_id=server_request_id,
    )


def from_rpc_error(error: grpc.RpcError) -> ScholarEmbedError:
    """Map a grpc.RpcError (sync or aio) to the typed exception, keeping rich details when present."""
    from grpc_status import rpc_status

    code: grpc.StatusCode = error.code()
    status: status_pb2.Status | None = None
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        status = None
    if status is None:
        status = status_pb2.Status(code=code.value[0], message=error.details() or "")
    return from_status(status, server_request_id=_trailer(error, REQUEST_ID_HEADER))


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    """One trailing-metadata value of a failed call; None when there is none (e.g. the server was never
    reached) or the error carries no call."""
    try:
        trailers = error.trailing_metadata() or ()
    except (AttributeError, TypeError, ValueError):
        return None
    return next((str(value) for name, value in trailers if name == key), None)
