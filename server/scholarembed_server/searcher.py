"""The search path every door shares: validate SearchService requests, embed through the shared
`TextEmbedder`, call the `VectorIndex`, and build the responses.

A door converts its wire format into `scholarembed.v1` search messages, calls `Searcher`, and converts
the answer back; errors are the domain exceptions of `errors`, mapped to status codes by each door.

Index calls block (disk, SQLite, FAISS), so they run in worker threads: one writer, since commits are
serialised anyway, and readers that never wait behind a commit. Upserts of one stream are embedded
concurrently but committed in request order (`my_turn`), so a later request's version of an id wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from scholarembed.v1 import search_pb2 as pb

from .config import ServerConfig
from .embedder import TextEmbedder
from .engine import InputType, Truncation, matryoshka
from .errors import FailedPreconditionError, InvalidArgumentError
from .index.base import (
    CollectionInfo,
    IndexKind,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    check_collection_name,
)

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


class Searcher:
    """SearchService's operations on `scholarembed.v1` messages, for every door."""

    def __init__(self, embedder: TextEmbedder, index: VectorIndex, config: ServerConfig) -> None:
        self._embedder = embedder
        self._engine = embedder.engine
        self.index = index
        self._config = config
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="index-write")
        self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="index-read")

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, lambda: function(*args))

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, lambda: function(*args))

    async def upsert(self, request: pb.UpsertPassagesRequest, my_turn: Awaitable[None] | None = None) -> int:
        """Embed and commit one request's passages; returns how many were upserted once committed.
        `my_turn`, if given, completes when the previous request of the same stream has committed."""
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
            lambda: self.index.create_collection(
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
        return await self._write(self.index.upsert, name, passages, vectors)

    def _check_compatible(self, info: CollectionInfo) -> None:
        if info.dimensions != self._engine.dimensions or info.model != self._engine.model_id:
            raise FailedPreconditionError(
                f"collection {info.name!r} holds {info.dimensions}-d vectors of model {info.model!r}; "
                f"this server runs {self._engine.model_id!r} ({self._engine.dimensions}-d)"
            )

    async def search(self, request: pb.SearchRequest, *, wait: bool) -> pb.SearchResponse:
        """`wait`: queue full -> wait (streams) or raise QueueFullError (unary calls)."""
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
        self._check_compatible(await self._read(self.index.get_collection, name))  # NOT_FOUND before embedding
        full, _ = await self._embedder.embed(
            self._engine.prompts.apply(queries, InputType.QUERY), Truncation.END, wait=wait, field="queries"
        )
        hits = await self._read(
            lambda: self.index.search(
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

    async def delete_passages(self, request: pb.DeletePassagesRequest) -> pb.DeletePassagesResponse:
        name = check_collection_name(request.collection)
        if not request.ids:
            raise InvalidArgumentError("ids", "must contain at least one id")
        return pb.DeletePassagesResponse(deleted=await self._write(self.index.delete, name, list(request.ids)))

    async def get_passages(self, request: pb.GetPassagesRequest) -> pb.GetPassagesResponse:
        name = check_collection_name(request.collection)
        if not request.ids or len(request.ids) > MAX_GET_IDS:
            raise InvalidArgumentError("ids", f"must contain 1 to {MAX_GET_IDS} ids, got {len(request.ids)}")
        passages = await self._read(self.index.get, name, list(request.ids))
        return pb.GetPassagesResponse(
            passages=[pb.Passage(id=p.id, title=p.title, text=p.text, metadata=dict(p.metadata)) for p in passages]
        )

    async def list_collections(self, request: pb.ListCollectionsRequest) -> pb.ListCollectionsResponse:
        infos = await self._read(self.index.list_collections)
        return pb.ListCollectionsResponse(collections=[collection_message(info) for info in infos])

    async def get_collection(self, request: pb.GetCollectionRequest) -> pb.GetCollectionResponse:
        name = check_collection_name(request.name, "name")
        info = await self._read(self.index.get_collection, name)
        return pb.GetCollectionResponse(collection=collection_message(info))

    async def delete_collection(self, request: pb.DeleteCollectionRequest) -> pb.DeleteCollectionResponse:
        name = check_collection_name(request.name, "name")
        return pb.DeleteCollectionResponse(deleted_passages=await self._write(self.index.delete_collection, name))

    def close(self) -> None:
        self._write_thread.shutdown(wait=True)
        self._read_threads.shutdown(wait=True)
