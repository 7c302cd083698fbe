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
from ..metrics import Metrics
from ..searcher import Searcher
from .admission import CallGate
from .status import unary
from .streams import in_band, serve_stream, wrapped_request


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, searcher: Searcher, config: ServerConfig, metrics: Metrics, gate: CallGate) -> None:
        self._searcher = searcher
        self._config = config
        self._metrics = metrics
        self._gate = gate

    async def UpsertPassages(
        self, request_iterator: AsyncIterator[pb.UpsertPassagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UpsertPassagesResponse]:
        previous_commit: asyncio.Future[None] | None = None

        async def answer(request: pb.UpsertPassagesRequest) -> pb.UpsertPassagesResponse:
            nonlocal previous_commit
            my_turn, previous_commit = previous_commit, asyncio.get_running_loop().create_future()
            committed = previous_commit
            try:
                upsert = self._searcher.upsert(request, my_turn)
                return await in_band(pb.UpsertPassagesResponse, request.request_id, "upserted", upsert)
            finally:
                committed.set_result(None)

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
