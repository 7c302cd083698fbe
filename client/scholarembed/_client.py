"""Client and AsyncClient: identical methods over the generated stubs; numpy arrays in, numpy arrays out."""

from __future__ import annotations

import abc
import asyncio
import enum
import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np

from . import errors
from .v1 import embedding_pb2 as pb
from .v1 import embedding_pb2_grpc as pb_grpc
from .v1 import search_pb2 as spb
from .v1 import search_pb2_grpc as spb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")


class InputType(enum.Enum):
    QUERY = pb.INPUT_TYPE_QUERY
    PASSAGE = pb.INPUT_TYPE_PASSAGE
    RAW = pb.INPUT_TYPE_RAW


class Encoding(enum.Enum):
    FLOAT32 = pb.ENCODING_FLOAT32
    FLOAT16 = pb.ENCODING_FLOAT16
    BINARY = pb.ENCODING_BINARY


class Truncation(enum.Enum):
    END = pb.TRUNCATION_END
    ERROR = pb.TRUNCATION_ERROR


@dataclass(frozen=True)
class EmbedResult:
    """Vectors and per-text details of one embed call.

    vectors: (n, dimensions) float32 or float16, or (n, ceil(dimensions / 8)) uint8 for BINARY.
    """

    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[bool]
    dimensions: int
    encoding: Encoding
    model: str
    total_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_source: str
    dimensions: int
    matryoshka_dimensions: tuple[int, ...]
    max_tokens: int
    dtype: str
    device: str
    query_prompt: str
    passage_prompt: str
    passage_untitled_prompt: str
    max_texts_per_request: int
    max_batch_tokens: int
    max_message_bytes: int


@dataclass(frozen=True)
class Passage:
    """A passage to store: id (unique in its collection), text, optional title and string metadata."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ListRank:
    """Where a hybrid hit stood in one list: rank from 1, and that list's score (cosine or BM25)."""

    rank: int
    score: float


@dataclass(frozen=True)
class Hit:
    """A search result; title, text and metadata are filled only when include_passages=True.

    score: cosine (dense), BM25 (lexical) or the fusion score (hybrid). In hybrid mode, dense and
    lexical say where the passage stood in each list (None: not among that list's candidates)."""

    id: str
    score: float
    title: str = ""
    text: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    dense: ListRank | None = None
    lexical: ListRank | None = None


@dataclass(frozen=True)
class Collection:
    name: str
    passage_count: int
    dimensions: int
    index_kind: str
    vector_storage: str
    model: str


@dataclass(frozen=True)
class UpsertAck:
    """One acknowledged upsert request: these ids are embedded and durably stored."""

    request_id: str
    ids: list[str]
    upserted: int


PassageLike = Passage | Mapping[str, Any]
"""A Passage, or a mapping with id (or BEIR's _id), text, and optional title and metadata."""


def passage_message(passage: PassageLike) -> spb.Passage:
    if isinstance(passage, Passage):
        return spb.Passage(id=passage.id, title=passage.title, text=passage.text, metadata=dict(passage.metadata))
    return spb.Passage(
        id=str(passage.get("id", passage.get("_id", ""))),
        title=str(passage.get("title") or ""),
        text=str(passage.get("text") or ""),
        metadata={str(k): str(v) for k, v in (passage.get("metadata") or {}).items()},
    )


def _passage(message: spb.Passage) -> Passage:
    return Passage(message.id, message.text, message.title, dict(message.metadata))


def _list_rank(hit: spb.Hit, name: str) -> ListRank | None:
    if not hit.HasField(name):  # type: ignore[arg-type]
        return None
    place: spb.ListRank = getattr(hit, name)
    return ListRank(place.rank, place.score)


def _hits(result: spb.QueryResult) -> list[Hit]:
    return [
        Hit(h.id, h.score, h.title, h.text, dict(h.metadata), _list_rank(h, "dense"), _list_rank(h, "lexical"))
        for h in result.hits
    ]


def _collection(message: spb.Collection) -> Collection:
    return Collection(
        name=message.name,
        passage_count=message.passage_count,
        dimensions=message.dimensions,
        index_kind=spb.IndexKind.Name(message.index_kind).removeprefix("INDEX_KIND_").lower(),
        vector_storage=spb.VectorStorage.Name(message.vector_storage).removeprefix("VECTOR_STORAGE_").lower(),
        model=message.model,
    )


def _collection_options(index_kind: str | None, vector_storage: str | None) -> spb.CollectionOptions:
    return spb.CollectionOptions(
        index_kind=(
            spb.IndexKind.Value(f"INDEX_KIND_{index_kind.upper()}") if index_kind else spb.INDEX_KIND_UNSPECIFIED
        ),
        vector_storage=(
            spb.VectorStorage.Value(f"VECTOR_STORAGE_{vector_storage.upper()}")
            if vector_storage
            else spb.VECTOR_STORAGE_UNSPECIFIED
        ),
    )


def _upsert_request(
    collection: str, number: int, chunk: list[PassageLike], options: spb.CollectionOptions, ids: dict[str, list[str]]
) -> tuple[str, spb.UpsertPassagesRequest]:
    """The request for one batch; records its ids under its request id, to be reported when acked."""
    messages = [passage_message(p) for p in chunk]
    request_id = str(number)
    ids[request_id] = [m.id for m in messages]
    return request_id, spb.UpsertPassagesRequest(
        collection=collection, passages=messages, request_id=request_id, options=options
    )


SEARCH_MODES = ("dense", "lexical", "hybrid")


@dataclass(frozen=True)
class SearchOptions:
    """What a search asks besides its queries (the keyword arguments of search, search_many, search_stream)."""

    top_k: int = 10
    dimensions: int | None = None
    include_passages: bool = False
    metadata_filter: Mapping[str, str] | None = None
    mode: str | None = None
    conditions: Sequence[spb.MetadataCondition] = ()
    rrf_k: int | None = None
    depth: int | None = None

    def request(self, collection: str, queries: Sequence[str]) -> spb.SearchRequest:
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not a single string")
        if self.mode is not None and self.mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {self.mode!r}")
        return spb.SearchRequest(
            collection=collection,
            queries=list(queries),
            top_k=self.top_k,
            dimensions=self.dimensions or 0,
            include_passages=self.include_passages,
            filter=dict(self.metadata_filter or {}),
            mode=spb.SearchMode.Value(f"SEARCH_MODE_{self.mode.upper()}") if self.mode else spb.SEARCH_MODE_UNSPECIFIED,
            hybrid=spb.HybridOptions(rrf_k=self.rrf_k or 0, depth=self.depth or 0),
            conditions=list(self.conditions),
        )


StreamItem = str | tuple[str, str]
"""An embed_stream input: a text, or a (title, text) pair for passages."""


def decode(response: pb.EmbedResponse) -> EmbedResult:
    """Turn an EmbedResponse into arrays, following the byte layouts documented in the proto."""
    encoding = Encoding(response.encoding)
    dtype = {Encoding.FLOAT32: "<f4", Encoding.FLOAT16: "<f2", Encoding.BINARY: "u1"}[encoding]
    width = (response.dimensions + 7) // 8 if encoding is Encoding.BINARY else response.dimensions
    buffer = b"".join(e.data for e in response.embeddings)
    vectors = np.frombuffer(buffer, dtype=dtype).reshape(len(response.embeddings), width)
    return EmbedResult(
        vectors=vectors.astype(vectors.dtype.newbyteorder("="), copy=False),
        token_counts=[e.token_count for e in response.embeddings],
        truncated=[e.truncated for e in response.embeddings],
        dimensions=response.dimensions,
        encoding=encoding,
        model=response.model,
        total_tokens=response.usage.total_tokens,
    )


def build_request(
    texts: Sequence[str],
    input_type: InputType | str,
    *,
    titles: Sequence[str] | None = None,
    dimensions: int | None = None,
    encoding: Encoding | str = Encoding.FLOAT32,
    truncation: Truncation | str | None = None,
) -> pb.EmbedRequest:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    return pb.EmbedRequest(
        texts=list(texts),
        input_type=_enum(InputType, input_type).value,
        titles=list(titles or []),
        dimensions=dimensions or 0,
        encoding=_enum(Encoding, encoding).value,
        truncation=_enum(Truncation, truncation).value if truncation else pb.TRUNCATION_UNSPECIFIED,
    )


def _enum(kind: type[Any], value: Any) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind[str(value).upper()]
    except KeyError:
        names = ", ".join(member.name.lower() for member in kind)
        raise ValueError(f"{value!r} is not a valid {kind.__name__}: use one of {names}") from None


def _model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=response.model_id,
        model_source=response.model_source,
        dimensions=response.dimensions,
        matryoshka_dimensions=tuple(response.matryoshka_dimensions),
        max_tokens=response.max_tokens,
        dtype=response.dtype,
        device=response.device,
        query_prompt=response.prompts.query,
        passage_prompt=response.prompts.passage,
        passage_untitled_prompt=response.prompts.passage_untitled,
        max_texts_per_request=response.limits.max_texts_per_request,
        max_batch_tokens=response.limits.max_batch_tokens,
        max_message_bytes=response.limits.max_message_bytes,
    )


def _split_items(chunk: Sequence[StreamItem]) -> tuple[list[str], list[str] | None]:
    if all(isinstance(item, str) for item in chunk):
        return [item for item in chunk if isinstance(item, str)], None
    titles, texts = [], []
    for item in chunk:
        title, text = ("", item) if isinstance(item, str) else item
        titles.append(title)
        texts.append(text)
    return texts, titles


def _batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _channel_credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


# Every RPC is safe to retry (upserts replace by id), so UNAVAILABLE -- a server that is down,
# draining or unreachable -- is retried on another address, with backoff, by gRPC itself.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "scholarembed.v1.EmbeddingService"}, {"service": "scholarembed.v1.SearchService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def resolve_target(target: str | Sequence[str]) -> str:
    """A gRPC target for one address, several "host:port" addresses (round-robin), or a `dns:` name.

    Several addresses must be IP literals (127.0.0.1:50051, [::1]:50051); for host names use
    "dns:///name:port", which resolves to every address of the name.
    """
    if isinstance(target, str):
        return target
    addresses = list(target)
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(addresses)}"


class _Options:
    """Connection settings shared by both clients."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None,
        tls: bool,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        token: str | None,
        max_message_bytes: int,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self.credentials = (
            _channel_credentials(root_certificates, private_key, certificate_chain)
            if tls or root_certificates or certificate_chain
            else None
        )
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        defaults: dict[str, Any] = {
            "grpc.max_receive_message_length": max_message_bytes,
            "grpc.max_send_message_length": max_message_bytes,
            "grpc.enable_retries": 1,
            "grpc.service_config": SERVICE_CONFIG,
        }
        # gRPC takes the first value given for a key, so the caller's options replace these, not follow them.
        self.channel_options = list({**defaults, **dict(channel_options)}.items())


class _StreamResponse(Protocol):
    request_id: str

    def HasField(self, field_name: str) -> bool: ...

    @property
    def error(self) -> Any: ...


R = TypeVar("R", bound=_StreamResponse)


def _check_stream_response(response: R, expected_id: str) -> R:
    if response.request_id != expected_id:
        raise errors.InternalError(f"stream out of order: got {response.request_id!r}, expected {expected_id!r}")
    if response.HasField("error"):
        raise errors.from_status(response.error, request_id=response.request_id)
    return response


def _ordered_stream(
    method: Any, messages: Iterable[tuple[str, Any]], max_in_flight: int, metadata: Sequence[tuple[str, str]]
) -> Iterator[Any]:
    """Run a bidirectional stream whose server answers each request once, in order.

    `messages` yields (request_id, request) and is read lazily, never more than `max_in_flight`
    requests ahead of the answers: memory stays flat whatever the input size. Each answer is checked
    (order, in-band error -> typed exception) before it is yielded.
    """
    slots = threading.BoundedSemaphore(max_in_flight)
    sent: deque[str] = deque()
    stop = threading.Event()

    def requests() -> Iterator[Any]:
        for request_id, message in messages:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            sent.append(request_id)
            yield message

    responses = method(requests(), metadata=metadata)
    try:
        for response in responses:
            checked = _check_stream_response(response, sent.popleft())
            slots.release()
            yield checked
    except grpc.RpcError as error:
        raise errors.from_rpc_error(error) from None
    finally:
        stop.set()
        responses.cancel()


async def _ordered_stream_async(
    method: Any, messages: AsyncIterator[tuple[str, Any]], max_in_flight: int, metadata: Sequence[tuple[str, str]]
) -> AsyncIterator[Any]:
    """asyncio twin of _ordered_stream."""
    slots = asyncio.Semaphore(max_in_flight)
    sent: deque[str] = deque()

    async def requests() -> AsyncIterator[Any]:
        async for request_id, message in messages:
            await slots.acquire()
            sent.append(request_id)
            yield message

    call = method(requests(), metadata=metadata)
    try:
        async for response in call:
            checked = _check_stream_response(response, sent.popleft())
            slots.release()
            yield checked
    except grpc.RpcError as error:
        raise errors.from_rpc_error(error) from None
    finally:
        call.cancel()


async def _aiter_chunks(items: Iterable[T] | AsyncIterable[T], size: int) -> AsyncIterator[list[T]]:
    if isinstance(items, AsyncIterable):
        chunk: list[T] = []
        async for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    else:
        for chunk in _batched(items, size):
            yield chunk


def _embed_stream_messages(
    chunks: Iterable[list[StreamItem]], input_type: InputType | str, dimensions: int | None, encoding: Encoding | str
) -> Iterator[tuple[str, pb.EmbedStreamRequest]]:
    for number, chunk in enumerate(chunks):
        yield str(number), _embed_stream_request(number, chunk, input_type, dimensions, encoding)


def _embed_stream_request(
    number: int, chunk: list[StreamItem], input_type: InputType | str, dimensions: int | None, encoding: Encoding | str
) -> pb.EmbedStreamRequest:
    texts, titles = _split_items(chunk)
    request = build_request(texts, input_type, titles=titles, dimensions=dimensions, encoding=encoding)
    return pb.EmbedStreamRequest(request_id=str(number), request=request)


class EmbedHelpers(abc.ABC):
    """embed_queries / embed_passages on top of `embed`, shared by every blocking transport."""

    @abc.abstractmethod
    def embed(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType | str,
        titles: Sequence[str] | None = None,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        truncation: Truncation | str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult: ...

    def embed_queries(self, texts: Sequence[str], dimensions: int | None = None) -> np.ndarray:
        """(n, d) float32 unit vectors for search queries."""
        return self.embed(texts, input_type=InputType.QUERY, dimensions=dimensions).vectors

    def embed_passages(
        self, texts: Sequence[str], titles: Sequence[str] | None = None, dimensions: int | None = None
    ) -> np.ndarray:
        """(n, d) float32 unit vectors for passages (abstracts, chunks), with optional titles."""
        return self.embed(texts, input_type=InputType.PASSAGE, titles=titles, dimensions=dimensions).vectors


class AsyncEmbedHelpers(abc.ABC):
    """The asyncio twin of EmbedHelpers."""

    @abc.abstractmethod
    async def embed(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType | str,
        titles: Sequence[str] | None = None,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        truncation: Truncation | str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult: ...

    async def embed_queries(self, texts: Sequence[str], dimensions: int | None = None) -> np.ndarray:
        """(n, d) float32 unit vectors for search queries."""
        return (await self.embed(texts, input_type=InputType.QUERY, dimensions=dimensions)).vectors

    async def embed_passages(
        self, texts: Sequence[str], titles: Sequence[str] | None = None, dimensions: int | None = None
    ) -> np.ndarray:
        """(n, d) float32 unit vectors for passages (abstracts, chunks), with optional titles."""
        return (await self.embed(texts, input_type=InputType.PASSAGE, titles=titles, dimensions=dimensions)).vectors


class Client(EmbedHelpers):
    """Blocking client. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as client:
    ...     queries = client.embed_queries(["graphene band gap"], dimensions=256)
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._options = _Options(
            target,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        if self._options.credentials is not None:
            self._channel = grpc.secure_channel(
                self._options.target, self._options.credentials, self._options.channel_options
            )
        else:
            self._channel = grpc.insecure_channel(self._options.target, self._options.channel_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._search_stub = spb_grpc.SearchServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        """The one place where unary calls are made and gRPC errors become typed exceptions."""
        try:
            return method(
                request,
                timeout=timeout if timeout is not None else self._options.timeout,
                metadata=self._options.metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def embed(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType | str,
        titles: Sequence[str] | None = None,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        truncation: Truncation | str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult:
        request = build_request(
            texts, input_type, titles=titles, dimensions=dimensions, encoding=encoding, truncation=truncation
        )
        return decode(self._call(self._stub.Embed, request, timeout))

    def model_info(self) -> ModelInfo:
        return _model_info(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest()))

    def embed_stream(
        self,
        items: Iterable[StreamItem],
        *,
        input_type: InputType | str = InputType.PASSAGE,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        batch_size: int = 64,
        max_in_flight: int = 8,
    ) -> Iterator[np.ndarray]:
        """Bulk-encode any iterable (texts, or (title, text) pairs) over one EmbedStream.

        Yields one array per batch of `batch_size` items, in input order. The input is read lazily and at
        most `max_in_flight` batches are outstanding, so memory stays flat on corpora of any size.
        A failed batch raises its typed exception (with its request_id) and ends the iteration.
        """
        messages = _embed_stream_messages(_batched(items, batch_size), input_type, dimensions, encoding)
        for response in _ordered_stream(self._stub.EmbedStream, messages, max_in_flight, self._options.metadata):
            yield decode(response.response).vectors

    # -- search ----------------------------------------------------------------------------------

    def upsert_stream(
        self,
        collection: str,
        passages: Iterable[PassageLike],
        *,
        batch_size: int = 64,
        max_in_flight: int = 8,
        index_kind: str | None = None,
        vector_storage: str | None = None,
    ) -> Iterator[UpsertAck]:
        """Stream passages into a collection (created on first use); yields one ack per batch, in order.

        An acked batch is durably stored. On a break, everything not acked can simply be sent again:
        upserting an id replaces it. A failed batch raises its typed exception.
        """
        acked_ids: dict[str, list[str]] = {}
        options = _collection_options(index_kind, vector_storage)
        messages = (
            _upsert_request(collection, number, chunk, options, acked_ids)
            for number, chunk in enumerate(_batched(passages, batch_size))
        )
        for response in _ordered_stream(
            self._search_stub.UpsertPassages, messages, max_in_flight, self._options.metadata
        ):
            yield UpsertAck(response.request_id, acked_ids.pop(response.request_id), response.upserted)

    def upsert_passages(self, collection: str, passages: Iterable[PassageLike], **options: Any) -> int:
        """Store all passages (see upsert_stream for the options); returns how many were upserted."""
        return sum(ack.upserted for ack in self.upsert_stream(collection, passages, **options))

    def search(
        self,
        query: str,
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
    ) -> list[Hit]:
        """Best passages for one query, best first.

        mode: "dense" (default), "lexical" (BM25) or "hybrid" (reciprocal-rank fusion with rrf_k,
        default 60, of each list's best `depth`, default max(100, top_k)). metadata_filter: exact
        values; conditions: scholarembed.filters (ranges, sets); all must hold."""
        return self.search_many(
            [query], collection=collection, top_k=top_k, dimensions=dimensions,
            include_passages=include_passages, metadata_filter=metadata_filter, mode=mode,
            conditions=conditions, rrf_k=rrf_k, depth=depth,
        )[0]  # fmt: skip

    def search_many(
        self,
        queries: Sequence[str],
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
    ) -> list[list[Hit]]:
        """One hit list per query, in query order (options as in search)."""
        options = SearchOptions(top_k, dimensions, include_passages, metadata_filter, mode, conditions, rrf_k, depth)
        return [
            _hits(result)
            for result in self._call(self._search_stub.Search, options.request(collection, queries)).results
        ]

    def search_stream(
        self,
        queries: Iterable[str],
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
        batch_size: int = 32,
        max_in_flight: int = 4,
    ) -> Iterator[list[Hit]]:
        """Search any number of queries over one SearchStream; yields one hit list per query, in order."""
        options = SearchOptions(top_k, dimensions, include_passages, metadata_filter, mode, conditions, rrf_k, depth)
        messages = (
            (str(n), spb.SearchStreamRequest(request_id=str(n), request=options.request(collection, chunk)))
            for n, chunk in enumerate(_batched(queries, batch_size))
        )
        for response in _ordered_stream(
            self._search_stub.SearchStream, messages, max_in_flight, self._options.metadata
        ):
            for result in response.response.results:
                yield _hits(result)

    def delete_passages(self, collection: str, ids: Sequence[str]) -> int:
        request = spb.DeletePassagesRequest(collection=collection, ids=list(ids))
        return int(self._call(self._search_stub.DeletePassages, request).deleted)

    def get_passages(self, collection: str, ids: Sequence[str]) -> list[Passage]:
        """The stored passages among `ids` (missing ids are left out), in the order of `ids`."""
        request = spb.GetPassagesRequest(collection=collection, ids=list(ids))
        return [_passage(p) for p in self._call(self._search_stub.GetPassages, request).passages]

    def list_collections(self) -> list[Collection]:
        response = self._call(self._search_stub.ListCollections, spb.ListCollectionsRequest())
        return [_collection(c) for c in response.collections]

    def get_collection(self, name: str) -> Collection:
        return _collection(self._call(self._search_stub.GetCollection, spb.GetCollectionRequest(name=name)).collection)

    def delete_collection(self, name: str) -> int:
        request = spb.DeleteCollectionRequest(name=name)
        return int(self._call(self._search_stub.DeleteCollection, request).deleted_passages)


class AsyncClient(AsyncEmbedHelpers):
    """asyncio twin of Client, with the same methods as coroutines (embed_stream is an async iterator)."""

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._options = _Options(
            target,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        if self._options.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                self._options.target, self._options.credentials, self._options.channel_options
            )
        else:
            self._channel = grpc.aio.insecure_channel(self._options.target, self._options.channel_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._search_stub = spb_grpc.SearchServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(
                request,
                timeout=timeout if timeout is not None else self._options.timeout,
                metadata=self._options.metadata,
            )
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def embed(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType | str,
        titles: Sequence[str] | None = None,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        truncation: Truncation | str | None = None,
        timeout: float | None = None,
    ) -> EmbedResult:
        request = build_request(
            texts, input_type, titles=titles, dimensions=dimensions, encoding=encoding, truncation=truncation
        )
        return decode(await self._call(self._stub.Embed, request, timeout))

    async def model_info(self) -> ModelInfo:
        return _model_info(await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest()))

    async def embed_stream(
        self,
        items: Iterable[StreamItem] | AsyncIterable[StreamItem],
        *,
        input_type: InputType | str = InputType.PASSAGE,
        dimensions: int | None = None,
        encoding: Encoding | str = Encoding.FLOAT32,
        batch_size: int = 64,
        max_in_flight: int = 8,
    ) -> AsyncIterator[np.ndarray]:
        """Async twin of Client.embed_stream; also accepts an async iterable."""

        async def messages() -> AsyncIterator[tuple[str, pb.EmbedStreamRequest]]:
            number = 0
            async for chunk in _aiter_chunks(items, batch_size):
                yield str(number), _embed_stream_request(number, chunk, input_type, dimensions, encoding)
                number += 1

        async for response in _ordered_stream_async(
            self._stub.EmbedStream, messages(), max_in_flight, self._options.metadata
        ):
            yield decode(response.response).vectors

    # -- search ----------------------------------------------------------------------------------

    async def upsert_stream(
        self,
        collection: str,
        passages: Iterable[PassageLike] | AsyncIterable[PassageLike],
        *,
        batch_size: int = 64,
        max_in_flight: int = 8,
        index_kind: str | None = None,
        vector_storage: str | None = None,
    ) -> AsyncIterator[UpsertAck]:
        """Async twin of Client.upsert_stream."""
        acked_ids: dict[str, list[str]] = {}
        options = _collection_options(index_kind, vector_storage)

        async def messages() -> AsyncIterator[tuple[str, spb.UpsertPassagesRequest]]:
            number = 0
            async for chunk in _aiter_chunks(passages, batch_size):
                yield _upsert_request(collection, number, chunk, options, acked_ids)
                number += 1

        async for response in _ordered_stream_async(
            self._search_stub.UpsertPassages, messages(), max_in_flight, self._options.metadata
        ):
            yield UpsertAck(response.request_id, acked_ids.pop(response.request_id), response.upserted)

    async def upsert_passages(
        self, collection: str, passages: Iterable[PassageLike] | AsyncIterable[PassageLike], **options: Any
    ) -> int:
        return sum([ack.upserted async for ack in self.upsert_stream(collection, passages, **options)])

    async def search(
        self,
        query: str,
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
    ) -> list[Hit]:
        """Best passages for one query, best first (options as in Client.search)."""
        return (
            await self.search_many(
                [query], collection=collection, top_k=top_k, dimensions=dimensions,
                include_passages=include_passages, metadata_filter=metadata_filter, mode=mode,
                conditions=conditions, rrf_k=rrf_k, depth=depth,
            )
        )[0]  # fmt: skip

    async def search_many(
        self,
        queries: Sequence[str],
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
    ) -> list[list[Hit]]:
        options = SearchOptions(top_k, dimensions, include_passages, metadata_filter, mode, conditions, rrf_k, depth)
        request = options.request(collection, queries)
        return [_hits(result) for result in (await self._call(self._search_stub.Search, request)).results]

    async def search_stream(
        self,
        queries: Iterable[str] | AsyncIterable[str],
        *,
        collection: str,
        top_k: int = 10,
        dimensions: int | None = None,
        include_passages: bool = False,
        metadata_filter: Mapping[str, str] | None = None,
        mode: str | None = None,
        conditions: Sequence[spb.MetadataCondition] = (),
        rrf_k: int | None = None,
        depth: int | None = None,
        batch_size: int = 32,
        max_in_flight: int = 4,
    ) -> AsyncIterator[list[Hit]]:
        options = SearchOptions(top_k, dimensions, include_passages, metadata_filter, mode, conditions, rrf_k, depth)

        async def messages() -> AsyncIterator[tuple[str, spb.SearchStreamRequest]]:
            number = 0
            async for chunk in _aiter_chunks(queries, batch_size):
                request = options.request(collection, chunk)
                yield str(number), spb.SearchStreamRequest(request_id=str(number), request=request)
                number += 1

        async for response in _ordered_stream_async(
            self._search_stub.SearchStream, messages(), max_in_flight, self._options.metadata
        ):
            for result in response.response.results:
                yield _hits(result)

    async def delete_passages(self, collection: str, ids: Sequence[str]) -> int:
        request = spb.DeletePassagesRequest(collection=collection, ids=list(ids))
        return int((await self._call(self._search_stub.DeletePassages, request)).deleted)

    async def get_passages(self, collection: str, ids: Sequence[str]) -> list[Passage]:
        request = spb.GetPassagesRequest(collection=collection, ids=list(ids))
        return [_passage(p) for p in (await self._call(self._search_stub.GetPassages, request)).passages]

    async def list_collections(self) -> list[Collection]:
        response = await self._call(self._search_stub.ListCollections, spb.ListCollectionsRequest())
        return [_collection(c) for c in response.collections]

    async def get_collection(self, name: str) -> Collection:
        response = await self._call(self._search_stub.GetCollection, spb.GetCollectionRequest(name=name))
        return _collection(response.collection)

    async def delete_collection(self, name: str) -> int:
        request = spb.DeleteCollectionRequest(name=name)
        return int((await self._call(self._search_stub.DeleteCollection, request)).deleted_passages)
