"""Client and AsyncClient: identical methods over the generated stubs; numpy arrays in, numpy arrays out."""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from . import errors
from .v1 import embedding_pb2 as pb
from .v1 import embedding_pb2_grpc as pb_grpc

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


class _Options:
    """Connection settings shared by both clients."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        tls: bool,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        max_message_bytes: int,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.credentials = (
            _channel_credentials(root_certificates, private_key, certificate_chain)
            if tls or root_certificates or certificate_chain
            else None
        )
        self.channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *channel_options,
        ]


class Client:
    """Blocking client. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as client:
    ...     queries = client.embed_queries(["graphene band gap"], dimensions=256)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
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
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        if self._options.credentials is not None:
            self._channel = grpc.secure_channel(target, self._options.credentials, self._options.channel_options)
        else:
            self._channel = grpc.insecure_channel(target, self._options.channel_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        """The one place where unary calls are made and gRPC errors become typed exceptions."""
        try:
            return method(request, timeout=timeout if timeout is not None else self._options.timeout)
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

    def embed_queries(self, texts: Sequence[str], dimensions: int | None = None) -> np.ndarray:
        """(n, d) float32 unit vectors for search queries."""
        return self.embed(texts, input_type=InputType.QUERY, dimensions=dimensions).vectors

    def embed_passages(
        self, texts: Sequence[str], titles: Sequence[str] | None = None, dimensions: int | None = None
    ) -> np.ndarray:
        """(n, d) float32 unit vectors for passages (abstracts, chunks), with optional titles."""
        return self.embed(texts, input_type=InputType.PASSAGE, titles=titles, dimensions=dimensions).vectors

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
        slots = threading.BoundedSemaphore(max_in_flight)
        sent: deque[str] = deque()
        stop = threading.Event()

        def requests() -> Iterator[pb.EmbedStreamRequest]:
            for number, chunk in enumerate(_batched(items, batch_size)):
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                texts, titles = _split_items(chunk)
                request_id = str(number)
                sent.append(request_id)
                yield pb.EmbedStreamRequest(
                    request_id=request_id,
                    request=build_request(texts, input_type, titles=titles, dimensions=dimensions, encoding=encoding),
                )

        responses = self._stub.EmbedStream(requests())
        try:
            for response in responses:
                expected = sent.popleft()
                if response.request_id != expected:
                    raise errors.InternalError(f"stream out of order: got {response.request_id}, expected {expected}")
                if response.HasField("error"):
                    raise errors.from_status(response.error, request_id=response.request_id)
                slots.release()
                yield decode(response.response).vectors
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        finally:
            stop.set()
            responses.cancel()


class AsyncClient:
    """asyncio twin of Client, with the same methods as coroutines (embed_stream is an async iterator)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
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
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        if self._options.credentials is not None:
            self._channel = grpc.aio.secure_channel(target, self._options.credentials, self._options.channel_options)
        else:
            self._channel = grpc.aio.insecure_channel(target, self._options.channel_options)
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)

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
            return await method(request, timeout=timeout if timeout is not None else self._options.timeout)
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

    async def embed_queries(self, texts: Sequence[str], dimensions: int | None = None) -> np.ndarray:
        return (await self.embed(texts, input_type=InputType.QUERY, dimensions=dimensions)).vectors

    async def embed_passages(
        self, texts: Sequence[str], titles: Sequence[str] | None = None, dimensions: int | None = None
    ) -> np.ndarray:
        return (await self.embed(texts, input_type=InputType.PASSAGE, titles=titles, dimensions=dimensions)).vectors

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
        slots = asyncio.Semaphore(max_in_flight)
        sent: deque[str] = deque()

        async def chunks() -> AsyncIterator[list[StreamItem]]:
            if isinstance(items, AsyncIterable):
                chunk: list[StreamItem] = []
                async for item in items:
                    chunk.append(item)
                    if len(chunk) == batch_size:
                        yield chunk
                        chunk = []
                if chunk:
                    yield chunk
            else:
                for chunk in _batched(items, batch_size):
                    yield chunk

        async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
            number = 0
            async for chunk in chunks():
                await slots.acquire()
                texts, titles = _split_items(chunk)
                request_id = str(number)
                number += 1
                sent.append(request_id)
                yield pb.EmbedStreamRequest(
                    request_id=request_id,
                    request=build_request(texts, input_type, titles=titles, dimensions=dimensions, encoding=encoding),
                )

        call = self._stub.EmbedStream(requests())
        try:
            async for response in call:
                expected = sent.popleft()
                if response.request_id != expected:
                    raise errors.InternalError(f"stream out of order: got {response.request_id}, expected {expected}")
                if response.HasField("error"):
                    raise errors.from_status(response.error, request_id=response.request_id)
                slots.release()
                yield decode(response.response).vectors
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        finally:
            call.cancel()
