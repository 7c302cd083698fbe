"""Bidirectional streams: admitted and timed as calls, answered in order with a bounded window of requests in
progress, each answer carrying its request's result or, in-band, its error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from .. import logs
from ..errors import InvalidArgumentError
from ..metrics import Metrics
from .admission import CallGate
from .status import abort, status_code, to_rpc_status

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


async def serve_stream(
    gate: CallGate,
    metrics: Metrics,
    rpc: str,
    context: grpc.aio.ServicerContext,
    request_iterator: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Coroutine[Any, Any, ResponseT]],
    window: int,
) -> AsyncIterator[ResponseT]:
    """Answer a bidirectional stream (see `ordered_stream`), timed, once `gate` admits it (a stream waits
    for a call slot rather than being refused)."""
    with metrics.track(rpc, context) as outcome:
        try:
            async with gate.admit(wait=True):
                async for response in ordered_stream(request_iterator, answer, window):
                    yield response
        except Exception as error:  # refused (the server is broken), or the request stream broke
            outcome.code = status_code(error)
            await abort(context, error)


async def ordered_stream(
    request_iterator: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Coroutine[Any, Any, ResponseT]],
    window: int,
) -> AsyncIterator[ResponseT]:
    """Answer each request once, in order, with up to `window` requests in progress at once.

    While the window is full the request stream is not read, so HTTP/2 flow control slows the
    client down instead of anything failing. `answer` reports errors in its response (`in_band`),
    never raises.
    """
    slots = asyncio.Semaphore(window)  # a request holds a slot from being read until its answer is sent
    in_progress: asyncio.Queue[asyncio.Task[ResponseT] | None] = asyncio.Queue()
    messages = aiter(request_iterator)

    async def read_requests() -> None:
        try:
            while True:
                await slots.acquire()
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    return
                await in_progress.put(asyncio.create_task(answer(message)))
        finally:
            await in_progress.put(None)

    reader = asyncio.create_task(read_requests())
    try:
        while (task := await in_progress.get()) is not None:
            yield await task
            slots.release()
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not in_progress.empty():
            if (pending := in_progress.get_nowait()) is not None:
                pending.cancel()


async def in_band(
    response_type: Callable[..., ResponseT], request_id: str, result_field: str, result: Awaitable[Any]
) -> ResponseT:
    """One stream request's answer: `response_type(request_id=..., <result_field>=<result>)`, or, if
    producing the result raised, the error in-band (`error`, a google.rpc.Status), so one bad request
    does not end a long bulk stream. Logs written meanwhile carry "<call id>/<request_id>"."""
    logs.request_id.set(f"{logs.request_id.get()}/{request_id}")  # this request's task has its own context
    try:
        return response_type(request_id=request_id, **{result_field: await result})
    except Exception as error:
        return response_type(request_id=request_id, error=to_rpc_status(error))


def wrapped_request(message: Any) -> Any:
    """A stream message's `request` field, or InvalidArgumentError if it has none."""
    if not message.HasField("request"):
        inner = message.DESCRIPTOR.fields_by_name["request"].message_type.name
        raise InvalidArgumentError("request", f"missing: every {message.DESCRIPTOR.name} carries its {inner}")
    return message.request
