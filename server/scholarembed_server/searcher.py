"""The search path every door shares: validate SearchService requests, embed through the shared
`TextEmbedder`, call the `VectorIndex`, and build the responses.

A door converts its wire format into `scholarembed.v1` search messages, calls `Searcher`, and converts
the answer back; errors are the domain exceptions of `errors`, mapped to status codes by each door.

Search modes: dense (the index's vector search), lexical (its BM25 search) and hybrid, which fuses
the two lists here, by reciprocal-rank fusion, so it is the same on every store. Metadata filters are
validated here into `index.base` conditions, which each store applies to every mode.

Index calls block (disk, SQLite, FAISS), so they run in worker threads: one writer, since commits are
serialised anyway, and readers that never wait behind a commit. Upserts of one stream are embedded
concurrently but committed in request order (`my_turn`), so a later request's version of an id wins. A
commit makes a write durable; the write is acknowledged once every search mode finds it too, which for
the embedded store means its lexical index has caught up. That wait happens off the write thread, so the
next request commits meanwhile and one catch-up (one tantivy commit) serves them all.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from scholarembed.v1 import search_pb2 as pb

from .config import ServerConfig
from .embedder import TextEmbedder
from .engine import matryoshka
from .errors import FailedPreconditionError, InvalidArgumentError
from .index.base import (
    AnyOf,
    CollectionInfo,
    Condition,
    Equals,
    Hit,
    IndexKind,
    Range,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    check_collection_name,
)
from .lifecycle import shut_down
from .model.prompts import InputType
from .model.tokenization import Truncation

MAX_ID_BYTES = 512
MAX_GET_IDS = 10_000
MAX_CONDITIONS = 64
MAX_SET_VALUES = 1024
DEFAULT_RRF_K = 60  # Cormack, Clarke and Buettcher (2009), and what most fusion systems use
MAX_RRF_K = 10_000
DEFAULT_HYBRID_DEPTH = 100
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


def validate_conditions(request: pb.SearchRequest) -> list[Condition]:
    """The request's `filter` map and `conditions` as index conditions, or InvalidArgumentError naming the field."""
    conditions: list[Condition] = [Equals(key, value) for key, value in sorted(request.filter.items())]
    if len(request.conditions) > MAX_CONDITIONS:
        raise InvalidArgumentError(
            "conditions", f"{len(request.conditions)} conditions exceed the limit of {MAX_CONDITIONS}"
        )
    for position, condition in enumerate(request.conditions):
        field = f"conditions[{position}]"
        if not condition.key:
            raise InvalidArgumentError(f"{field}.key", "must not be empty")
        kind = condition.WhichOneof("condition")
        if kind == "equals":
            conditions.append(Equals(condition.key, condition.equals))
        elif kind == "any_of":
            values = tuple(condition.any_of.values)
            if not 1 <= len(values) <= MAX_SET_VALUES:
                raise InvalidArgumentError(
                    f"{field}.any_of.values", f"must hold 1 to {MAX_SET_VALUES} values, got {len(values)}"
                )
            conditions.append(AnyOf(condition.key, values))
        elif kind == "range":
            conditions.append(_range(condition.key, condition.range, f"{field}.range"))
        else:
            raise InvalidArgumentError(field, "sets none of equals, any_of, range")
    return conditions


def _range(key: str, message: pb.NumericRange, field: str) -> Range:
    bounds = {name: getattr(message, name) for name in ("gt", "gte", "lt", "lte") if message.HasField(name)}
    if not bounds:
        raise InvalidArgumentError(field, "sets none of gt, gte, lt, lte")
    for name, bound in bounds.items():
        if not math.isfinite(bound):
            raise InvalidArgumentError(f"{field}.{name}", f"must be a finite number, got {bound}")
    if "gt" in bounds and "gte" in bounds:
        raise InvalidArgumentError(field, "sets both gt and gte; keep one lower bound")
    if "lt" in bounds and "lte" in bounds:
        raise InvalidArgumentError(field, "sets both lt and lte; keep one upper bound")
    lower = bounds.get("gt", bounds.get("gte", -math.inf))
    upper = bounds.get("lt", bounds.get("lte", math.inf))
    if lower > upper:
        raise InvalidArgumentError(field, f"lower bound {lower} is above upper bound {upper}")
    return Range(key, **bounds)


def reciprocal_rank_fusion(
    lists: dict[str, Sequence[Hit]], rrf_k: int, top_k: int
) -> list[tuple[str, float, dict[str, tuple[int, float]]]]:
    """(id, sum of 1 / (rrf_k + rank), {list name: (rank, score)}) of the best top_k, best first;
    ties go to the smaller id, so a result never depends on the order lists were searched in."""
    fused: dict[str, dict[str, tuple[int, float]]] = {}
    for list_name, hits in lists.items():
        for rank, hit in enumerate(hits, start=1):
            fused.setdefault(hit.id, {})[list_name] = (rank, hit.score)
    scored = [(id_, sum(1.0 / (rrf_k + rank) for rank, _ in places.values()), places) for id_, places in fused.items()]
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:top_k]


def _hit_message(hit: Hit) -> pb.Hit:
    if hit.passage is None:
        return pb.Hit(id=hit.id, score=hit.score)
    return pb.Hit(
        id=hit.id, score=hit.score, title=hit.passage.title, text=hit.passage.text, metadata=dict(hit.passage.metadata)
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
        # Writes waiting to become searchable (a lexical catch-up): one of them leads each catch-up, the
        # others wait for it; a write waits here, never in a thread that searches or writes.
        self._searchable_threads = ThreadPoolExecutor(8, thread_name_prefix="index-catch-up")

    async def _read(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, lambda: function(*args))

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, lambda: function(*args))

    async def upsert(
        self,
        request: pb.UpsertPassagesRequest,
        my_turn: Awaitable[None] | None = None,
        on_committed: Callable[[], None] | None = None,
    ) -> int:
        """Embed and commit one request's passages; returns how many were upserted once they are durable and
        found by every search mode. `my_turn`, if given, completes when the previous request of the same
        stream has committed; `on_committed` is called once this one has, before it is searchable every way,
        so the next request can commit while this one's lexical index catches up (several at once)."""
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
        committed = await self._write(self.index.commit_upsert, name, passages, vectors)
        if on_committed is not None:
            on_committed()
        # Not in the write thread: the next request commits meanwhile, and one catch-up serves both.
        await asyncio.get_running_loop().run_in_executor(self._searchable_threads, committed.wait_searchable)
        return committed.count

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
        if request.mode not in pb.SearchMode.values():
            raise InvalidArgumentError("mode", f"unknown search mode {request.mode}")
        conditions = validate_conditions(request)
        mode = request.mode or pb.SEARCH_MODE_DENSE
        if mode == pb.SEARCH_MODE_HYBRID:
            rrf_k, depth = self._hybrid_options(request)
        info = await self._read(self.index.get_collection, name)  # NOT_FOUND before embedding
        if mode == pb.SEARCH_MODE_LEXICAL:
            hits = await self._lexical(name, queries, request.top_k, conditions, request.include_passages)
            return pb.SearchResponse(results=[pb.QueryResult(hits=map(_hit_message, h)) for h in hits])
        self._check_compatible(info)
        full, _ = await self._embedder.embed(
            self._engine.prompts.apply(queries, InputType.QUERY), Truncation.END, wait=wait, field="queries"
        )
        vectors = matryoshka(full, dimensions)
        if mode == pb.SEARCH_MODE_DENSE:
            hits = await self._read(
                lambda: self.index.search(
                    name, vectors, request.top_k, metadata_filter=conditions, include_passages=request.include_passages
                )
            )
            return pb.SearchResponse(results=[pb.QueryResult(hits=map(_hit_message, h)) for h in hits])
        dense, lexical = await asyncio.gather(
            self._read(lambda: self.index.search(name, vectors, depth, metadata_filter=conditions)),
            self._lexical(name, queries, depth, conditions, include_passages=False),
        )
        fused = [
            reciprocal_rank_fusion({"dense": d, "lexical": lx}, rrf_k, request.top_k)
            for d, lx in zip(dense, lexical, strict=True)
        ]
        passages: dict[str, StoredPassage] = {}
        if request.include_passages:
            winners = list(dict.fromkeys(id_ for query_hits in fused for id_, _, _ in query_hits))
            passages = {p.id: p for p in await self._read(self.index.get, name, winners)}
        results = []
        for query_hits in fused:
            messages = []
            for id_, score, places in query_hits:
                message = _hit_message(Hit(id_, score, passages.get(id_)))
                for list_name, (rank, list_score) in places.items():
                    getattr(message, list_name).CopyFrom(pb.ListRank(rank=rank, score=list_score))
                messages.append(message)
            results.append(pb.QueryResult(hits=messages))
        return pb.SearchResponse(results=results)

    def _hybrid_options(self, request: pb.SearchRequest) -> tuple[int, int]:
        rrf_k = request.hybrid.rrf_k or DEFAULT_RRF_K
        if rrf_k > MAX_RRF_K:
            raise InvalidArgumentError("hybrid.rrf_k", f"must be at most {MAX_RRF_K}, got {rrf_k}")
        max_top_k = self._config.max_top_k
        depth = request.hybrid.depth or min(max(DEFAULT_HYBRID_DEPTH, request.top_k), max_top_k)
        if not request.top_k <= depth <= max_top_k:
            raise InvalidArgumentError(
                "hybrid.depth", f"must be between top_k ({request.top_k}) and {max_top_k}, got {depth}"
            )
        return rrf_k, depth

    async def _lexical(
        self, name: str, queries: list[str], top_k: int, conditions: list[Condition], include_passages: bool
    ) -> list[list[Hit]]:
        return await self._read(
            lambda: self.index.lexical_search(
                name, queries, top_k, metadata_filter=conditions, include_passages=include_passages
            )
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

    async def close(self) -> None:
        """Wait for the index calls in progress (a commit under way finishes) without blocking the event loop."""
        await asyncio.gather(*map(shut_down, (self._write_thread, self._read_threads, self._searchable_threads)))
