"""Domain errors to gRPC statuses, in one place: `to_rpc_status`, with google.rpc.BadRequest naming the
field and google.rpc.RetryInfo when the server is busy (unary calls: in the trailers, see `unary`;
streams: in-band, see `streams.in_band`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import logs
from ..errors import InvalidArgumentError, RetryLaterError, ScholarEmbedError
from ..metrics import Metrics
from .admission import CallGate

log = logging.getLogger(__name__)

T = TypeVar("T")


def to_rpc_status(error: BaseException) -> status_pb2.Status:
    """The one mapping from exceptions to google.rpc.Status."""
    if not isinstance(error, ScholarEmbedError):
        log.error("unexpected error", exc_info=error)
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(error).__name__}")
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    if isinstance(error, InvalidArgumentError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        detail = error_details_pb2.BadRequest(field_violations=[violation])
        status.details.add().Pack(detail)
    elif isinstance(error, RetryLaterError):
        seconds = int(error.retry_after_s)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((error.retry_after_s - seconds) * 1e9))
        )
        status.details.add().Pack(retry)
    return status


def status_code(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, ScholarEmbedError) else grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    status = rpc_status.to_status(to_rpc_status(error))
    # abort's trailing metadata replaces what the call had set: the request id goes along again.
    trailing = (*status.trailing_metadata, (logs.REQUEST_ID_HEADER, logs.request_id.get()))
    await context.abort(status.code, status.details, trailing)


async def unary(
    gate: CallGate, metrics: Metrics, rpc: str, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]
) -> T:
    """Answer a unary RPC once `gate` admits it (refused at once when the server is full): time it, and
    turn an error into the call's status (with its details)."""
    with metrics.track(rpc, context) as outcome:
        try:
            async with gate.admit(wait=False):
                return await call()
        except Exception as error:
            outcome.code = status_code(error)
            await abort(context, error)
    raise AssertionError("unreachable: abort raises")
