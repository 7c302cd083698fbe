"""Which gRPC calls get in: none once the server is broken, and at most --max-concurrent-rpcs at once.

The guard against unbounded work sits here, in the servicers, where it can answer the documented way,
not in the transport. gRPC's own limits answer with a refused stream (REFUSED_STREAM), which grpc.aio
clients may even report as INTERNAL, or a RESOURCE_EXHAUSTED without a retry hint:

- A unary call beyond the limit gets RESOURCE_EXHAUSTED with google.rpc.RetryInfo at once.
- A stream beyond it waits for a call to end before any of its requests is read, so HTTP/2 flow
  control holds its sender back, as a full token queue does. Refusing it instead would race the
  client's writes: a grpc.aio client whose write fails on a call the server has ended reports
  "Internal error from Core" (INTERNAL) in place of the server's status.

Health checking and reflection are not servicers of ours, so they are never counted: a probe must
get through to a busy server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..errors import TooManyCallsError
from ..lifecycle import Phase, ServingState
from ..metrics import Metrics


class CallGate:
    """Admits gRPC calls to the EmbeddingService and SearchService servicers."""

    def __init__(self, serving: ServingState, max_calls: int, metrics: Metrics) -> None:
        self._serving = serving
        self._max_calls = max_calls
        self._metrics = metrics
        self._slots = asyncio.Semaphore(max_calls)

    @contextlib.asynccontextmanager
    async def admit(self, *, wait: bool) -> AsyncIterator[None]:
        """Hold one of the call slots for the call's duration. A broken server refuses every call
        (UNAVAILABLE); a full one refuses it (TooManyCallsError) unless `wait`, which waits for a slot."""
        self._refuse_if_broken()
        if self._slots.locked():
            if not wait:
                raise TooManyCallsError(self._max_calls)
            self._metrics.calls_waiting.inc()
            try:
                await self._slots.acquire()
            finally:
                self._metrics.calls_waiting.dec()
        else:
            await self._slots.acquire()
        self._metrics.calls_in_progress.inc()
        try:
            self._refuse_if_broken()  # it may have broken while this call waited
            yield
        finally:
            self._metrics.calls_in_progress.dec()
            self._slots.release()

    def _refuse_if_broken(self) -> None:
        # Only a broken server refuses here: warming up and draining are the embedding path's to answer
        # (calls that need no model, such as GetPassages, are served meanwhile), and a drain is gRPC's own.
        if self._serving.phase is Phase.BROKEN:
            self._serving.check()
