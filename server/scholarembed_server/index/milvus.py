"""The Milvus store (`--index-uri`): one Milvus collection per scholarembed collection, through MilvusClient.

The URI is a Milvus server or cluster ("http://host:19530", "https://user:password@host:19530/db")
or a local path ending in ".db", which pymilvus opens with milvus-lite inside this process (one
process per .db folder: milvus-lite holds a file lock on it). A search returns at most 16384 hits
per query, Milvus's largest limit.

Layout of a collection, as the Milvus collection <prefix><escaped name>:
    id          VARCHAR primary key (512 bytes)     title, text   VARCHAR (65535 bytes each)
    metadata    JSON (string values)                vector        FLOAT_VECTOR, full dimension, unit length
    vector_<d>  FLOAT_VECTOR: the first d components, re-normalised, for each stored Matryoshka prefix d
    lexical     VARCHAR: title + "\n" + text, its first 65535 bytes, analysed (standard tokenizer,
                lowercase, English stemmer) for Milvus's built-in BM25 function, which fills
    lexical_bm25 SPARSE_FLOAT_VECTOR, searched with metric BM25 (lexical search)
    metadata_numbers JSON: the metadata values that are numbers (base.as_number), as numbers, which
                numeric ranges compare (Milvus cannot cast a JSON string)
    properties  scholarembed.model, scholarembed.index_kind, scholarembed.prefix_dimensions
Milvus names allow only [A-Za-z0-9_], so "_" is written "__" and "-" "_h". Vectors are stored as
float32 whatever storage was asked for: milvus-lite has no float16 vectors, and one layout serves both.

Matryoshka dimensions: Milvus cannot search a prefix of a vector field. A search at d
    - uses `vector_<d>` when the collection stores it (exact with FLAT, like the full dimension);
    - otherwise searches the smallest stored field wider than d for max(10 * top_k, 100) candidates
      (at most 16384, Milvus's largest limit) and re-ranks them exactly on the re-normalised d-prefix.
      This is approximate: a passage that is near at d but not among the candidates is missed.
Prefix fields cost storage (768 + 512 + 256 + 128 floats per passage for EmbeddingGemma, 2.3x the
full vector alone), so they are created for the dimensions given to the constructor, the smallest
first (their ranking differs most from the full one), within Milvus's default of 4 vector fields per
collection. They are fixed when a collection is created. The BM25 field counts as a vector field too.

Lexical search and numeric ranges need fields that collections made before them lack: Milvus cannot
add a function or a vector field to an existing collection, so on those they are FAILED_PRECONDITION
(re-index into a new collection to get them). milvus-lite 3.2.2 (measured) has BM25 full-text search,
lowercases, but ignores the stemmer filter: "genes" does not match "gene" there, unlike on a server.
It reports BM25 scores negated; hits carry the score as a positive number on both.

Writes, honestly:
    - An upsert is one Milvus upsert request, validated here first (sizes, shapes) so that nothing is
      sent that Milvus would refuse halfway. Milvus acknowledges a write once it is in its write-ahead
      log (Woodpecker, Pulsar or Kafka) and flushes segments to object storage by itself; we never call
      flush(), which is rate-limited on a cluster and only makes small segments. Milvus documents
      atomic writes per vchannel; collections are created with one shard, so one vchannel. A request
      that fails in between may still have been applied in part: retrying the same upsert is safe.
    - milvus-lite appends one upsert as one WAL record batch (a torn batch is dropped on recovery, so
      it is all or nothing) and flushes it to the OS, not to the disk: an acknowledged write survives
      the process dying, not a power loss. Its flush() would not help: it writes Parquet files
      without fsync and then fsyncs a manifest that points to them.
    - Searches see this process's own writes (Session consistency); other writers' a moment later.
Every write goes through one lock, so a delete's count (queried first: Milvus's delete does not
say how many ids existed) matches what it deleted, as long as this process is the only writer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import numpy as np
from pymilvus import DataType, Function, FunctionType, MilvusClient, MilvusException

from ..errors import FailedPreconditionError, InvalidArgumentError, ScholarEmbedError
from .base import (
    AnyOf,
    CollectionInfo,
    CollectionNotFoundError,
    Condition,
    CorruptCollectionError,
    Equals,
    Hit,
    IndexKind,
    LexicalUnavailableError,
    MetadataFilter,
    Range,
    StorageError,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    as_number,
    check_collection_name,
    conditions_of,
    prefix_normalised,
)

log = logging.getLogger(__name__)

MAX_ID_BYTES = 512
MAX_TEXT_BYTES = 65535  # Milvus's largest VARCHAR
MAX_METADATA_BYTES = 65536  # Milvus's limit on one JSON value
MAX_VECTOR_FIELDS = 4  # Milvus's default proxy.maxVectorFieldNum
MAX_LIMIT = 16384  # the most hits one Milvus search returns
RERANK_FACTOR = 10
RERANK_MIN_CANDIDATES = 100
IDS_PER_QUERY = 500  # ids per `id in [...]` expression
COLLECTION_NOT_FOUND = 100  # Milvus's error code, also used by milvus-lite

HNSW_BUILD = {"M": 32, "efConstruction": 80}  # as the embedded store
HNSW_MIN_EF = 128
IVF_BUILD = {"nlist": 1024}  # per segment; milvus-lite clamps it to a segment's rows
IVF_SEARCH = {"nprobe": 128}  # nlist / 8: recall first, as the embedded store
METRIC = "COSINE"  # vectors are unit length, so this equals IP; it also keeps scores cosines for any query

ANALYZER = {"tokenizer": "standard", "filter": ["lowercase", {"type": "stemmer", "language": "english"}]}
LEXICAL_FIELD = "lexical"
BM25_FIELD = "lexical_bm25"
NUMBERS_FIELD = "metadata_numbers"

_INDEX_TYPES = {IndexKind.FLAT: "FLAT", IndexKind.HNSW: "HNSW", IndexKind.IVF: "IVF_FLAT"}
_PASSAGE_FIELDS = ["id", "title", "text", "metadata"]
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


class MilvusUnavailableError(ScholarEmbedError):
    """Milvus could not be reached, or failed a read; the message carries Milvus's own."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class _Layout:
    """What a collection holds; fixed at creation, so read once per process."""

    milvus_name: str
    dimensions: int
    model: str
    index_kind: IndexKind
    prefix_dimensions: tuple[int, ...]  # ascending, all below `dimensions`
    lexical: bool = True  # has the BM25 and metadata_numbers fields (collections made since they exist)

    def info(self, name: str, passage_count: int) -> CollectionInfo:
        return CollectionInfo(name, passage_count, self.dimensions, self.index_kind, VectorStorage.FLOAT32, self.model)

    def field_for(self, dimensions: int) -> str:
        """The vector field holding `dimensions` exactly, or the smallest one wider than it."""
        stored = [d for d in self.prefix_dimensions if d >= dimensions]
        return _vector_field(stored[0], self.dimensions) if stored else "vector"

    def width(self, field: str) -> int:
        return self.dimensions if field == "vector" else int(field.removeprefix("vector_"))

    def search_params(self, limit: int) -> dict[str, Any]:
        if self.index_kind is IndexKind.HNSW:
            return {"metric_type": METRIC, "params": {"ef": max(HNSW_MIN_EF, limit)}}
        if self.index_kind is IndexKind.IVF:
            return {"metric_type": METRIC, "params": dict(IVF_SEARCH)}
        return {"metric_type": METRIC, "params": {}}


class MilvusIndex(VectorIndex):
    """Collections in a Milvus server or cluster, or in a milvus-lite .db folder."""

    def __init__(
        self, uri: str, *, matryoshka_dims: Sequence[int] | None = None, collection_prefix: str = "scholarembed_"
    ) -> None:
        self.uri = uri
        self.matryoshka_dims = tuple(sorted({int(d) for d in matryoshka_dims or ()}))
        self.collection_prefix = collection_prefix
        self._local_path = _local_path(uri)
        if self._local_path is not None:
            self._local_path.parent.mkdir(parents=True, exist_ok=True)
        self._shown_uri = _without_credentials(uri)
        try:
            self._client = MilvusClient(uri=uri)
        except MilvusException as error:
            hint = " (milvus-lite serves one process per .db folder: is another one using it?)"
            raise MilvusUnavailableError(
                f"cannot open Milvus at {self._shown_uri!r}: {error.message}{hint if self._local_path else ''}"
            ) from error
        self._write_lock = threading.Lock()
        self._layouts: dict[str, _Layout] = {}  # name -> layout of a collection seen to exist

    # -- collections -------------------------------------------------------------------------------

    def create_collection(
        self, name: str, *, dimensions: int, model: str, index_kind: IndexKind, vector_storage: VectorStorage
    ) -> CollectionInfo:
        check_collection_name(name)
        with self._write_lock:
            milvus_name = self._milvus_name(name)
            with self._reading(name):
                exists = self._client.has_collection(milvus_name)
            if exists:
                return self.get_collection(name)
            prefixes = tuple(d for d in self.matryoshka_dims if d < dimensions)[: MAX_VECTOR_FIELDS - 2]
            layout = _Layout(milvus_name, dimensions, model, index_kind, prefixes)
            try:
                self._client.create_collection(
                    milvus_name,
                    schema=_schema(layout),
                    num_shards=1,
                    consistency_level="Session",
                    properties={
                        "scholarembed.model": model,
                        "scholarembed.index_kind": index_kind.value,
                        "scholarembed.prefix_dimensions": ",".join(map(str, prefixes)),
                    },
                )
            except MilvusException as error:
                if not self._client.has_collection(milvus_name):  # else another writer created it first
                    raise StorageError(f"collection {name!r}: Milvus could not create it: {error.message}") from error
                return self.get_collection(name)
            try:
                # Nothing to build yet: pymilvus would poll each index for half a second.
                self._client.create_index(milvus_name, self._index_params(layout), sync=False)
                self._client.load_collection(milvus_name)
            except MilvusException as error:
                try:
                    self._client.drop_collection(milvus_name)  # a collection appears whole or not at all
                except MilvusException:
                    log.exception("collection %r: could not drop the unindexed Milvus collection", name)
                raise StorageError(f"collection {name!r}: Milvus could not index it: {error.message}") from error
            self._layouts[name] = layout
            return layout.info(name, 0)

    def get_collection(self, name: str) -> CollectionInfo:
        layout = self._layout(name)
        return layout.info(name, self._count(name, layout))

    def list_collections(self) -> list[CollectionInfo]:
        with self._reading(None):
            milvus_names = self._client.list_collections()
        ours = [m.removeprefix(self.collection_prefix) for m in milvus_names if m.startswith(self.collection_prefix)]
        names = sorted(name for name in map(_unescape, ours) if name is not None)
        infos = []
        for name in names:
            try:
                infos.append(self.get_collection(name))
            except CollectionNotFoundError:
                continue  # dropped meanwhile
        return infos

    def delete_collection(self, name: str) -> int:
        layout = self._layout(name)
        with self._write_lock:
            count = self._count(name, layout)
            with self._writing(name, "it may still exist"):
                self._client.drop_collection(layout.milvus_name)
            self._layouts.pop(name, None)
            return count

    # -- passages ----------------------------------------------------------------------------------

    def upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        layout = self._layout(name)
        if vectors.shape != (len(passages), layout.dimensions):
            raise InvalidArgumentError(
                "passages", f"expected {len(passages)} vectors of {layout.dimensions} dims, got {vectors.shape}"
            )
        if not passages:
            return 0
        rows = _rows(passages, vectors, layout)
        with self._write_lock, self._writing(name, "it may be applied in part (retrying it is safe)"):
            self._client.upsert(layout.milvus_name, rows)
        return len(passages)

    def delete(self, name: str, ids: Sequence[str]) -> int:
        layout = self._layout(name)
        with self._write_lock:
            existing = [passage.id for passage in self._get(name, layout, ids, ["id"])]
            with self._writing(name, "it may be applied in part (retrying it is safe)"):
                for chunk in _chunks(existing, IDS_PER_QUERY):
                    self._client.delete(layout.milvus_name, filter=_id_filter(chunk))
            return len(existing)

    def get(self, name: str, ids: Sequence[str]) -> list[StoredPassage]:
        return self._get(name, self._layout(name), ids, _PASSAGE_FIELDS)

    def search(
        self,
        name: str,
        queries: np.ndarray,
        top_k: int,
        *,
        metadata_filter: Mapping[str, str] | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        layout = self._layout(name)
        dimensions = int(queries.shape[1])
        if not 1 <= dimensions <= layout.dimensions:
            raise InvalidArgumentError("dimensions", f"{dimensions} is not within 1..{layout.dimensions}")
        if len(queries) == 0:
            return []
        limit = min(top_k, MAX_LIMIT)
        expression = _filter_expression(name, layout, conditions_of(metadata_filter))
        field = layout.field_for(dimensions)
        native = field == _vector_field(dimensions, layout.dimensions)  # else candidates to re-rank
        wanted = limit if native else min(MAX_LIMIT, max(RERANK_FACTOR * limit, RERANK_MIN_CANDIDATES))
        output_fields = (_PASSAGE_FIELDS if include_passages else ["id"]) if native else ["id", field]
        with self._reading(name):
            results = self._client.search(
                layout.milvus_name,
                data=_padded(queries, layout.width(field)),
                anns_field=field,
                limit=wanted,
                filter=expression,
                output_fields=output_fields,
                search_params=layout.search_params(wanted),
            )
        if native:
            return [[_hit(hit, include_passages) for hit in hits] for hits in results]
        return self._reranked(name, layout, queries, results, field, limit, include_passages)

    def lexical_search(
        self,
        name: str,
        queries: Sequence[str],
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        layout = self._layout(name)
        if not layout.lexical:
            raise LexicalUnavailableError(
                f"collection {name!r} was created before lexical search existed and Milvus cannot add it; "
                "re-index it into a new collection for lexical and hybrid modes"
            )
        expression = _filter_expression(name, layout, conditions_of(metadata_filter))
        texts = list(queries)  # BM25 text has no syntax: Milvus's analyser splits it as it split the passages
        asked = [position for position, text in enumerate(texts) if text.strip()]
        results: list[list[Hit]] = [[] for _ in queries]
        if not asked:
            return results
        with self._reading(name):
            found = self._client.search(
                layout.milvus_name,
                data=[texts[position] for position in asked],
                anns_field=BM25_FIELD,
                limit=min(top_k, MAX_LIMIT),
                filter=expression,
                output_fields=_PASSAGE_FIELDS if include_passages else ["id"],
                search_params={"metric_type": "BM25"},
            )
        for position, hits in zip(asked, found, strict=True):
            # BM25 scores are positive; milvus-lite reports them negated.
            results[position] = [
                Hit(h.id, abs(h.score), h.passage) for h in (_hit(hit, include_passages) for hit in hits)
            ]
        return results

    def close(self) -> None:
        with self._write_lock:
            self._client.close()
            if self._local_path is not None:
                # milvus-lite runs in this process and keeps its file lock until released: closing it
                # flushes its memtables and lets another process open the .db folder.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(str(self._local_path))

    # -- internals ---------------------------------------------------------------------------------

    def _milvus_name(self, name: str) -> str:
        return self.collection_prefix + name.replace("_", "__").replace("-", "_h")

    def _layout(self, name: str) -> _Layout:
        check_collection_name(name)
        layout = self._layouts.get(name)
        if layout is not None:
            return layout
        milvus_name = self._milvus_name(name)
        with self._reading(name):
            if not self._client.has_collection(milvus_name):  # asked first: a failed describe logs an error
                raise CollectionNotFoundError(name)
            description = self._client.describe_collection(milvus_name)
            # Milvus keeps a collection loaded across restarts; milvus-lite does not. Loading twice is a no-op.
            self._client.load_collection(milvus_name)
        layout = _layout_of(name, milvus_name, description)
        self._layouts[name] = layout
        return layout

    def _count(self, name: str, layout: _Layout) -> int:
        with self._reading(name):
            (row,) = self._client.query(layout.milvus_name, filter="", output_fields=["count(*)"])
        return int(row["count(*)"])

    def _get(self, name: str, layout: _Layout, ids: Sequence[str], fields: list[str]) -> list[StoredPassage]:
        found: dict[str, StoredPassage] = {}
        unique = list(dict.fromkeys(ids))
        with self._reading(name):
            for chunk in _chunks(unique, IDS_PER_QUERY):
                for row in self._client.query(layout.milvus_name, filter=_id_filter(chunk), output_fields=fields):
                    found[row["id"]] = _passage(row)
        return [found[i] for i in unique if i in found]

    def _reranked(
        self,
        name: str,
        layout: _Layout,
        queries: np.ndarray,
        results: Any,
        field: str,
        limit: int,
        include_passages: bool,
    ) -> list[list[Hit]]:
        """Exact scores on the d-prefix of the candidates a wider field found; the best `limit` of them."""
        dimensions = int(queries.shape[1])
        query_prefixes = prefix_normalised(queries, dimensions)
        ranked: list[list[tuple[str, float]]] = []
        for query, hits in zip(query_prefixes, results, strict=True):
            if not hits:
                ranked.append([])
                continue
            candidates = np.asarray([hit["entity"][field] for hit in hits], dtype=np.float32)
            scores = prefix_normalised(candidates, dimensions) @ query
            best = np.argsort(-scores, kind="stable")[:limit]
            ranked.append([(hits[int(i)]["id"], float(scores[i])) for i in best])
        passages: dict[str, StoredPassage] = {}
        if include_passages:
            winners = list(dict.fromkeys(id_ for hits in ranked for id_, _ in hits))
            passages = {p.id: p for p in self._get(name, layout, winners, _PASSAGE_FIELDS)}
        return [[Hit(id_, score, passages.get(id_)) for id_, score in hits] for hits in ranked]

    def _index_params(self, layout: _Layout) -> Any:
        params = self._client.prepare_index_params()
        build = {IndexKind.HNSW: HNSW_BUILD, IndexKind.IVF: IVF_BUILD}.get(layout.index_kind, {})
        for dimensions in (*layout.prefix_dimensions, layout.dimensions):
            params.add_index(
                field_name=_vector_field(dimensions, layout.dimensions),
                index_type=_INDEX_TYPES[layout.index_kind],
                metric_type=METRIC,
                params=dict(build),
            )
        if layout.lexical:
            params.add_index(field_name=BM25_FIELD, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        return params

    @contextmanager
    def _reading(self, name: str | None) -> Iterator[None]:
        try:
            yield
        except MilvusException as error:
            self._raise_not_found(name, error)
            raise MilvusUnavailableError(f"Milvus at {self._shown_uri!r} failed a read: {error.message}") from error

    @contextmanager
    def _writing(self, name: str, consequence: str) -> Iterator[None]:
        try:
            yield
        except MilvusException as error:
            self._raise_not_found(name, error)
            message = f"collection {name!r}: Milvus failed the write, {consequence}: {error.message}"
            raise StorageError(message) from error

    def _raise_not_found(self, name: str | None, error: MilvusException) -> None:
        if name is not None and error.code == COLLECTION_NOT_FOUND:
            self._layouts.pop(name, None)  # dropped by another writer
            raise CollectionNotFoundError(name) from error


def _local_path(uri: str) -> Path | None:
    """The milvus-lite folder a URI names, or None for a server."""
    if uri.startswith(("http://", "https://", "tcp://", "unix:")):
        return None
    if not uri.endswith(".db"):
        raise InvalidArgumentError(
            "index_uri", f"{uri!r} is neither a Milvus URL (http://host:19530) nor a milvus-lite path ending in .db"
        )
    return Path(uri).absolute()


def _without_credentials(uri: str) -> str:
    """The URI as errors may show it: pymilvus takes user:password@ in it, clients must not see them."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _vector_field(dimensions: int, full_dimensions: int) -> str:
    return "vector" if dimensions == full_dimensions else f"vector_{dimensions}"


def _unescape(escaped: str) -> str | None:
    """The collection name `_milvus_name` escaped, or None if it is not one."""
    name = escaped.replace("__", "\0").replace("_h", "-")
    if "_" in name:
        return None
    name = name.replace("\0", "_")
    try:
        return check_collection_name(name)
    except InvalidArgumentError:
        return None


def _schema(layout: _Layout) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("title", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field(NUMBERS_FIELD, DataType.JSON)
    schema.add_field(
        LEXICAL_FIELD, DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True, analyzer_params=ANALYZER
    )
    schema.add_field(BM25_FIELD, DataType.SPARSE_FLOAT_VECTOR)
    schema.add_function(
        Function(
            name="lexical_bm25", function_type=FunctionType.BM25, input_field_names=[LEXICAL_FIELD],
            output_field_names=[BM25_FIELD],
        )
    )  # fmt: skip
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=layout.dimensions)
    for dimensions in layout.prefix_dimensions:
        schema.add_field(_vector_field(dimensions, layout.dimensions), DataType.FLOAT_VECTOR, dim=dimensions)
    return schema


def _layout_of(name: str, milvus_name: str, description: Mapping[str, Any]) -> _Layout:
    properties = description.get("properties") or {}
    vector = next((f for f in description.get("fields", []) if f.get("name") == "vector"), None)
    if "scholarembed.model" not in properties or vector is None:
        raise CorruptCollectionError(
            f"collection {name!r}: the Milvus collection {milvus_name!r} was not made by scholarembed "
            "(no scholarembed.* properties or no vector field)"
        )
    prefixes = properties.get("scholarembed.prefix_dimensions", "")
    field_names = {f.get("name") for f in description.get("fields", [])}
    return _Layout(
        milvus_name,
        int(vector["params"]["dim"]),
        properties["scholarembed.model"],
        IndexKind(properties["scholarembed.index_kind"]),
        tuple(sorted(int(d) for d in prefixes.split(",") if d)),
        lexical={BM25_FIELD, NUMBERS_FIELD} <= field_names,
    )


def _rows(passages: Sequence[StoredPassage], vectors: np.ndarray, layout: _Layout) -> list[dict[str, Any]]:
    """Milvus rows, or InvalidArgumentError before anything is sent if one would not fit the schema."""
    for position, passage in enumerate(passages):
        for field, value, limit in (
            ("id", passage.id, MAX_ID_BYTES),
            ("title", passage.title, MAX_TEXT_BYTES),
            ("text", passage.text, MAX_TEXT_BYTES),
            ("metadata", json.dumps(dict(passage.metadata), ensure_ascii=False), MAX_METADATA_BYTES),
        ):
            if len(value.encode()) > limit:
                raise InvalidArgumentError(
                    f"passages[{position}].{field}", f"longer than {limit} bytes, the Milvus store's limit"
                )
    columns = {"vector": prefix_normalised(vectors, layout.dimensions)}
    for dimensions in layout.prefix_dimensions:
        columns[_vector_field(dimensions, layout.dimensions)] = prefix_normalised(vectors, dimensions)
    return [
        {
            "id": passage.id,
            "title": passage.title,
            "text": passage.text,
            "metadata": dict(passage.metadata),
            **(_lexical_columns(passage) if layout.lexical else {}),
            **{field: matrix[row].tolist() for field, matrix in columns.items()},
        }
        for row, passage in enumerate(passages)
    ]


def _lexical_columns(passage: StoredPassage) -> dict[str, Any]:
    numbers = {key: as_number(value) for key, value in passage.metadata.items()}
    # The analysed text is cut to Milvus's largest VARCHAR at a character boundary: words beyond it
    # are stored (title, text) but not found by lexical search.
    lexical = (passage.title + "\n" + passage.text).encode()[:MAX_TEXT_BYTES].decode(errors="ignore")
    return {
        LEXICAL_FIELD: lexical,
        NUMBERS_FIELD: {key: number for key, number in numbers.items() if number is not None},
    }


def _padded(queries: np.ndarray, width: int) -> list[list[float]]:
    """Unit queries zero-padded to a field's width: against a wider prefix p of a passage they score
    cos_d(query, passage) * |p[:d]| / |p|, which ranks candidates for the exact re-ranking."""
    padded = np.zeros((len(queries), width), dtype=np.float32)
    padded[:, : queries.shape[1]] = prefix_normalised(queries, queries.shape[1])
    return padded.tolist()


def _literal(value: str) -> str:
    """A double-quoted string in Milvus's expression language; milvus-lite knows only these escapes."""
    return '"' + value.translate(_ESCAPES) + '"'


def _id_filter(ids: Sequence[str]) -> str:
    return f"id in [{', '.join(_literal(i) for i in ids)}]"


def _filter_expression(name: str, layout: _Layout, conditions: Sequence[Condition]) -> str:
    """Every condition (base.matches) in Milvus's expression language; milvus-lite has no filter
    templates, so values are escaped literals and numbers Python's repr (finite, always parsed)."""
    clauses = []
    for condition in conditions:
        value = f"metadata[{_literal(condition.key)}]"
        if isinstance(condition, Equals):
            clauses.append(f"{value} == {_literal(condition.value)}")
        elif isinstance(condition, AnyOf):  # milvus-lite has no `in` on JSON values
            clauses.append("(" + " or ".join(f"{value} == {_literal(v)}" for v in condition.values) + ")")
        elif isinstance(condition, Range):
            if not layout.lexical:
                raise FailedPreconditionError(
                    f"collection {name!r} was created before numeric ranges existed and Milvus cannot add "
                    "them; re-index it into a new collection to filter by ranges"
                )
            number = f"{NUMBERS_FIELD}[{_literal(condition.key)}]"
            for operator, bound in (
                (">", condition.gt), (">=", condition.gte), ("<", condition.lt), ("<=", condition.lte)
            ):  # fmt: skip
                if bound is not None:
                    clauses.append(f"{number} {operator} {float(bound)!r}")
    return " and ".join(clauses)


def _passage(row: Mapping[str, Any]) -> StoredPassage:
    return StoredPassage(row["id"], row.get("title", ""), row.get("text", ""), dict(row.get("metadata") or {}))


def _hit(hit: Mapping[str, Any], include_passages: bool) -> Hit:
    passage = _passage({**hit["entity"], "id": hit["id"]}) if include_passages else None
    return Hit(hit["id"], float(hit["distance"]), passage)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
