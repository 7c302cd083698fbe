"""SearchService over gRPC: validate -> embed (shared batcher) -> VectorIndex -> convert.

Index calls block (disk, SQLite, FAISS), so they run in worker threads. Upserts on one stream are
embedded concurrently but committed in request order, so a later request's version of an id wins;
each response is sent only after its request's commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from scholarembed.v1 import search_pb2 as pb
from scholarembed.v1 import search_pb2_grpc as pb_grpc

from .config import ServerConfig
from .engine import InputType, Truncation, matryoshka
from .errors import InvalidArgumentError, ScholarEmbedError
from .index.base import (
    CollectionInfo,
    IndexKind,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    check_collection_name,
)
from .metrics import Metrics
from .servicer import TextEmbedder, abort, ordered_stream, status_code, to_rpc_status

log = logging.getLogger(__name__)

MAX_ID_BYTES = 512
MAX_GET_IDS = 10_000
T = TypeVar("T")

_INDEX_KINDS = {
    pb.INDEX_KIND_FLAT: IndexKind.FLAT,
    pb.INDEX_KIND_HNSW: IndexKind.HNSW,
    pb.INDEX_KIND_IVF: IndexKind.IVF,
}
_STORAGES = {pb.VECTOR_STORAGE_FLOAT16: VectorStorage.FLOAT16, pb.VECTOR_STORAGE_FLOAT32: VectorStorage.FLOAT32}


def collection_message(info: CollectionInfo) -> pb.Collection:
    return pb.Collection(
        name=info.name,
        passage_count=info.passage_count,
        dimensions=info.dimensions,
        index_kind={v: k for k, v in _INDEX_KINDS.items()}[info.index_kind],
        vector_storage={v: k for k, v in _STORAGES.items()}[info.vector_storage],
        model=info.model,
    )


def validate_passages(passages: Any, max_passages: int) -> list[StoredPassage]:
    if not passages:
        raise InvalidArgumentError("passages", "must contain at least one passage")
    if len(passages) > max_passages:
        raise InvalidArgumentError("passages", f"{len(passages)} passages exceed the limit of {max_passages}")
    seen: set[str] = set()
    result = []
    for index, passage in enumerate(passages):
        if not passage.id:
            raise InvalidArgumentError(f"passages[{index}].id", "must not be empty")
        if len(passage.id.encode()) > MAX_ID_BYTES:
            raise InvalidArgumentError(f"passages[{index}].id", f"longer than {MAX_ID_BYTES} bytes")
        if passage.id in seen:
            raise InvalidArgumentError(f"passages[{index}].id", f"duplicate id {passage.id!r} in this request")
        if not passage.text.strip():
            raise InvalidArgumentError(f"passages[{index}].text", "must not be empty or whitespace only")
        seen.add(passage.id)
        result.append(StoredPassage(passage.id, passage.title, passage.text, dict(passage.metadata)))
    return result


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, embedder: TextEmbedder, index: VectorIndex, config: ServerConfig, metrics: Metrics) -> None:
        self._embedder = embedder
        self._engine = embedder.engine
        self._index = index
        self._config = config
        self._metrics = metrics
        metrics.watch_index(index)
        # One writer thread: commits are serialised anyway, and searches must not wait behind them.
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="index-write")
        self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="index-read")

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, lambda: function(*args))

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, lambda: function(*args))

    async def _unary(self, rpc: str, context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
        with self._metrics.track(rpc, context) as outcome:
            try:
                return await call
            except Exception as error:
                outcome.code = status_code(error)
                await abort(context, error)
        raise AssertionError("unreachable: abort raises")

    # -- upsert ------------------------------------------------------------------------------------

    async def UpsertPassages(
        self, request_iterator: AsyncIterator[pb.UpsertPassagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UpsertPassagesResponse]:
        previous_commit: asyncio.Future[None] | None = None

        async def answer(request: pb.UpsertPassagesRequest) -> pb.UpsertPassagesResponse:
            nonlocal previous_commit
            my_turn, previous_commit = previous_commit, asyncio.get_running_loop().create_future()
            committed = previous_commit
            try:
                upserted = await self._upsert(request, my_turn)
                return pb.UpsertPassagesResponse(request_id=request.request_id, upserted=upserted)
            except Exception as error:
                return pb.UpsertPassagesResponse(request_id=request.request_id, error=to_rpc_status(error))
            finally:
                committed.set_result(None)

        with self._metrics.track("UpsertPassages", context):
            async for response in ordered_stream(request_iterator, answer, self._config.stream_window):
                yield response

    async def _upsert(self, request: pb.UpsertPassagesRequest, my_turn: Awaitable[None] | None) -> int:
        name = check_collection_name(request.collection)
        passages = validate_passages(request.passages, self._config.max_texts_per_request)
        if request.options.index_kind not in (0, *_INDEX_KINDS):
            raise InvalidArgumentError("options.index_kind", f"unknown index kind {request.options.index_kind}")
        if request.options.vector_storage not in (0, *_STORAGES):
            raise InvalidArgumentError("options.vector_storage", f"unknown storage {request.options.vector_storage}")
        texts = self._engine.prompts.apply([p.text for p in passages], InputType.PASSAGE, [p.title for p in passages])
        vectors, _ = await self._embedder.embed(texts, Truncation.END, wait=True, field="passages")
        if my_turn is not None:
            await asyncio.shield(my_turn)
        info = await self._write(
            lambda: self._index.create_collection(
                name,
                dimensions=self._engine.dimensions,
                model=self._engine.model_id,
                index_kind=_INDEX_KINDS.get(request.options.index_kind, IndexKind(self._config.index_kind)),
                vector_storage=_STORAGES.get(
                    request.options.vector_storage, VectorStorage(self._config.vector_storage)
                ),
            )
        )
        self._check_compatible(info)
        return await self._write(self._index.upsert, name, passages, vectors)

    def _check_compatible(self, info: CollectionInfo) -> None:
        if info.dimensions != self._engine.dimensions or info.model != self._engine.model_id:
            raise _FailedPrecondition(
                f"collection {info.name!r} holds {info.dimensions}-d vectors of model {info.model!r}; "
                f"this server runs {self._engine.model_id!r} ({self._engine.dimensions}-d)"
            )

    # -- search ------------------------------------------------------------------------------------

    async def search(self, request: pb.SearchRequest, *, wait: bool) -> pb.SearchResponse:
        name = check_collection_name(request.collection)
        queries = list(request.queries)
        if not queries:
            raise InvalidArgumentError("queries", "must contain at least one query")
        if len(queries) > self._config.max_texts_per_request:
            raise InvalidArgumentError(
                "queries", f"{len(queries)} queries exceed the limit of {self._config.max_texts_per_request}"
            )
        for position, query in enumerate(queries):
            if not query.strip():
                raise InvalidArgumentError(f"queries[{position}]", "must not be empty or whitespace only")
        if not 1 <= request.top_k <= self._config.max_top_k:
            raise InvalidArgumentError("top_k", f"must be between 1 and {self._config.max_top_k}, got {request.top_k}")
        dimensions = self._engine.check_dimensions(request.dimensions)
        self._check_compatible(await self._read(self._index.get_collection, name))  # NOT_FOUND before embedding
        full, _ = await self._embedder.embed(
            self._engine.prompts.apply(queries, InputType.QUERY), Truncation.END, wait=wait, field="queries"
        )
        hits = await self._read(
            lambda: self._index.search(
                name,
                matryoshka(full, dimensions),
                request.top_k,
                metadata_filter=dict(request.filter),
                include_passages=request.include_passages,
            )
        )
        return pb.SearchResponse(
            results=[
                pb.QueryResult(
                    hits=[
                        pb.Hit(id=hit.id, score=hit.score)
                        if hit.passage is None
                        else pb.Hit(
                            id=hit.id,
                            score=hit.score,
                            title=hit.passage.title,
                            text=hit.passage.text,
                            metadata=dict(hit.passage.metadata),
                        )
                        for hit in query_hits
                    ]
                )
                for query_hits in hits
            ]
        )

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        return await self._unary("Search", context, self.search(request, wait=False))

    async def SearchStream(
        self, request_iterator: AsyncIterator[pb.SearchStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SearchStreamResponse]:
        async def answer(message: pb.SearchStreamRequest) -> pb.SearchStreamResponse:
            try:
                if not message.HasField("request"):
                    raise InvalidArgumentError("request", "missing: every SearchStreamRequest carries a SearchRequest")
                response = await self.search(message.request, wait=True)
                return pb.SearchStreamResponse(request_id=message.request_id, response=response)
            except Exception as error:
                return pb.SearchStreamResponse(request_id=message.request_id, error=to_rpc_status(error))

        with self._metrics.track("SearchStream", context):
            async for response in ordered_stream(request_iterator, answer, self._config.stream_window):
                yield response

    # -- collections -------------------------------------------------------------------------------

    async def DeletePassages(
        self, request: pb.DeletePassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeletePassagesResponse:
        async def run() -> pb.DeletePassagesResponse:
            name = check_collection_name(request.collection)
            if not request.ids:
                raise InvalidArgumentError("ids", "must contain at least one id")
            return pb.DeletePassagesResponse(deleted=await self._write(self._index.delete, name, list(request.ids)))

        return await self._unary("DeletePassages", context, run())

    async def GetPassages(
        self, request: pb.GetPassagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPassagesResponse:
        async def run() -> pb.GetPassagesResponse:
            name = check_collection_name(request.collection)
            if not request.ids or len(request.ids) > MAX_GET_IDS:
                raise InvalidArgumentError("ids", f"must contain 1 to {MAX_GET_IDS} ids, got {len(request.ids)}")
            passages = await self._read(self._index.get, name, list(request.ids))
            return pb.GetPassagesResponse(
                passages=[pb.Passage(id=p.id, title=p.title, text=p.text, metadata=dict(p.metadata)) for p in passages]
            )

        return await self._unary("GetPassages", context, run())

    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        async def run() -> pb.ListCollectionsResponse:
            infos = await self._read(self._index.list_collections)
            return pb.ListCollectionsResponse(collections=[collection_message(info) for info in infos])

        return await self._unary("ListCollections", context, run())

    async def GetCollection(
        self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCollectionResponse:
        async def run() -> pb.GetCollectionResponse:
            name = check_collection_name(request.name, "name")
            return pb.GetCollectionResponse(
                collection=collection_message(await self._read(self._index.get_collection, name))
            )

        return await self._unary("GetCollection", context, run())

    async def DeleteCollection(
        self, request: pb.DeleteCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteCollectionResponse:
        async def run() -> pb.DeleteCollectionResponse:
            name = check_collection_name(request.name, "name")
            return pb.DeleteCollectionResponse(deleted_passages=await self._write(self._index.delete_collection, name))

        return await self._unary("DeleteCollection", context, run())

    def close(self) -> None:
        self._write_thread.shutdown(wait=True)
        self._read_threads.shutdown(wait=True)


class _FailedPrecondition(ScholarEmbedError):
    code = grpc.StatusCode.FAILED_PRECONDITION
