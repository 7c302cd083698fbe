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
from ..errors import InvalidArgumentError, SearchDisabledError
from ..metrics import Metrics
from ..searcher import Searcher
from .status import abort, to_rpc_status, unary
from .streams import ordered_stream


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, searcher: Searcher, config: ServerConfig, metrics: Metrics) -> None:
        self._searcher = searcher
        self._config = config
        self._metrics = metrics

    async def UpsertPassages(
        self, request_iterator: AsyncIterator[pb.UpsertPassagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UpsertPassagesResponse]:
        previous_commit: asyncio.Future[None] | None = None

        async def answer(request: pb.UpsertPassagesRequest) -> pb.UpsertPassagesResponse:
            nonlocal previous_commit
            my_turn, previous_commit = previous_commit, asyncio.get_running_loop().create_future()
            committed = previous_commit
            try:
                upserted = await self._searcher.upsert(request, my_turn)
                return pb.UpsertPassagesResponse(request_id=request.request_id, upserted=upserted)
            except Exception as error:
                return pb.UpsertPassagesResponse(request_id=request.request_id, error=to_rpc_status(error))
            finally:
                committed.set_result(None)

        with self._metrics.track("UpsertPassages", context):
            async for response in ordered_stream(request_iterator, answer, self._config.stream_window):
                yield response

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        return await unary(self._metrics, "Search", context, self._searcher.search(request, wait=False))

    async def SearchStream(
        self, request_iterator: AsyncIterator[pb.SearchStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SearchStreamResponse]:
        async def answer(message: pb.SearchStreamRequest) -> pb.SearchStreamResponse:
            try:
                if not message.HasField("request"):
                    raise InvalidArgumentError("request", "missing: every SearchStreamRequest carries a SearchRequest")
                response = await self._searcher.search(message.request, wait=True)
                return pb.SearchStreamResponse(request_id=message.request_id, response=response)
            except Exception as error:
                return pb.SearchStreamResponse(request_id=message.request_id, error=to_rpc_status(error))

        with self._metrics.track("SearchStream", context):
            async for response in ordered_stream(request_iterator, answer, self._config.stream_window):
                yield response

    async def DeletePassages(
        self, request: pb.DeletePassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePassagesResponse:
        return await unary(self._metrics, "DeletePassages", context, self._searcher.delete_passages(request))

    async def GetPassages(
        self, request: pb.GetPassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPassagesResponse:
        return await unary(self._metrics, "GetPassages", context, self._searcher.get_passages(request))

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        return await unary(self._metrics, "ListCollections", context, self._searcher.list_collections(request))

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        return await unary(self._metrics, "GetCollection", context, self._searcher.get_collection(request))

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        return await unary(self._metrics, "DeleteCollection", context, self._searcher.delete_collection(request))


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
