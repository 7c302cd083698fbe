"""SearchService over gRPC: a thin door over the shared `Searcher` (validation, embedding, the index).

Each upsert response is sent only after its request's commit; streams report per-item errors in-band.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from scholarembed.v1 import search_pb2 as pb
from scholarembed.v1 import search_pb2_grpc as pb_grpc

from ..config import ServerConfig
from ..errors import SearchDisabledError
from ..metrics import Metrics
from ..searcher import Searcher
from .admission import CallGate
from .status import abort, unary
from .streams import in_band, serve_stream, wrapped_request


class CommitLine:
    """The commit order of one UpsertPassages stream: each request commits only after the one before it
    has committed or failed, whatever order their embeddings finish in, so a later version of an id wins.

    A request joins the line when it is read (`join`: its turn, and the future it completes when done)
    and leaves it (`leave`) as soon as its write is durable, before its lexical index has caught up, so
    the requests behind it commit meanwhile and one catch-up makes them all searchable; or when answered,
    if it failed. One that fails before its turn (bad input, a failed embedding) passes its turn on only
    once its turn has come, so the request after it cannot overtake the one before it.
    """

    def __init__(self) -> None:
        self._last_done: asyncio.Future[None] | None = None

    def join(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        my_turn, self._last_done = self._last_done, asyncio.get_running_loop().create_future()
        return my_turn, self._last_done

    @staticmethod
    def leave(my_turn: asyncio.Future[None] | None, done: asyncio.Future[None]) -> None:
        """Pass the turn on: once committed, or once failed (which may happen after it committed)."""
        if done.done():
            return
        if my_turn is None or my_turn.done():
            done.set_result(None)
        else:
            my_turn.add_done_callback(lambda _: done.done() or done.set_result(None))


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, searcher: Searcher, config: ServerConfig, metrics: Metrics, gate: CallGate) -> None:
        self._searcher = searcher
        self._config = config
        self._metrics = metrics
        self._gate = gate

    async def UpsertPassages(
        self, request_iterator: AsyncIterator[pb.UpsertPassagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UpsertPassagesResponse]:
        line = CommitLine()

        async def answer(request: pb.UpsertPassagesRequest) -> pb.UpsertPassagesResponse:
            my_turn, done = line.join()
            try:
                upsert = self._searcher.upsert(request, my_turn, on_committed=lambda: line.leave(my_turn, done))
                return await in_band(pb.UpsertPassagesResponse, request.request_id, "upserted", upsert)
            finally:
                line.leave(my_turn, done)

        async for response in serve_stream(
            self._gate, self._metrics, "UpsertPassages", context, request_iterator, answer, self._config.stream_window
        ):
            yield response

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        return await unary(
            self._gate, self._metrics, "Search", context, lambda: self._searcher.search(request, wait=False)
        )

    async def SearchStream(
        self, request_iterator: AsyncIterator[pb.SearchStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SearchStreamResponse]:
        async def search(message: pb.SearchStreamRequest) -> pb.SearchResponse:
            return await self._searcher.search(wrapped_request(message), wait=True)

        async def answer(message: pb.SearchStreamRequest) -> pb.SearchStreamResponse:
            return await in_band(pb.SearchStreamResponse, message.request_id, "response", search(message))

        async for response in serve_stream(
            self._gate, self._metrics, "SearchStream", context, request_iterator, answer, self._config.stream_window
        ):
            yield response

    async def DeletePassages(
        self, request: pb.DeletePassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePassagesResponse:
        return await unary(
            self._gate, self._metrics, "DeletePassages", context, lambda: self._searcher.delete_passages(request)
        )

    async def GetPassages(
        self, request: pb.GetPassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPassagesResponse:
        return await unary(
            self._gate, self._metrics, "GetPassages", context, lambda: self._searcher.get_passages(request)
        )

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        return await unary(
            self._gate, self._metrics, "ListCollections", context, lambda: self._searcher.list_collections(request)
        )

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        return await unary(
            self._gate, self._metrics, "GetCollection", context, lambda: self._searcher.get_collection(request)
        )

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        return await unary(
            self._gate, self._metrics, "DeleteCollection", context, lambda: self._searcher.delete_collection(request)
        )


def search_disabled_handler() -> grpc.GenericRpcHandler:
    """SearchService on a server without a store: every method answers UNIMPLEMENTED with the flags that
    turn search on, where an unregistered service would only say "Method not found!"."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await abort(context, SearchDisabledError())

    service = pb.DESCRIPTOR.services_by_name["SearchService"]
    handlers = {
        method.name: {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming](refuse)
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
