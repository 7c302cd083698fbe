"""Bidirectional streams answered in order, with a bounded window of requests in progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


async def ordered_stream(
    request_iterator: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Awaitable[ResponseT]],
    window: int,
) -> AsyncIterator[ResponseT]:
    """Answer each request once, in order, with up to `window` requests in progress at once.

    While the window is full the request stream is not read, so HTTP/2 flow control slows the
    client down instead of anything failing. `answer` reports errors in its response, never raises.
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
