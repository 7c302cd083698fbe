"""EmbeddingService over gRPC: validate -> convert -> engine (through the batcher) -> convert.

Domain errors become gRPC statuses in one place, `to_rpc_status`, with google.rpc.BadRequest naming
the field (unary calls: in the trailers; streams: in-band in EmbedStreamResponse.error).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc

from . import logs
from .batcher import Batcher
from .config import ServerConfig
from .engine import EmbeddingEngine, InputType, TokenizedText, Truncation, matryoshka
from .errors import InvalidArgumentError, QueueFullError, ScholarEmbedError, UnavailableError
from .metrics import Metrics

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_INPUT_TYPES = {
    pb.INPUT_TYPE_QUERY: InputType.QUERY,
    pb.INPUT_TYPE_PASSAGE: InputType.PASSAGE,
    pb.INPUT_TYPE_RAW: InputType.RAW,
}
_TRUNCATIONS = {
    pb.TRUNCATION_UNSPECIFIED: Truncation.END,
    pb.TRUNCATION_END: Truncation.END,
    pb.TRUNCATION_ERROR: Truncation.ERROR,
}
_ENCODINGS = {
    pb.ENCODING_UNSPECIFIED: pb.ENCODING_FLOAT32,
    pb.ENCODING_FLOAT32: pb.ENCODING_FLOAT32,
    pb.ENCODING_FLOAT16: pb.ENCODING_FLOAT16,
    pb.ENCODING_BINARY: pb.ENCODING_BINARY,
}


@dataclass(frozen=True)
class EmbedJob:
    """A validated EmbedRequest, with the prompts already applied."""

    prompted_texts: list[str]
    dimensions: int
    encoding: int
    truncation: Truncation


def validate_embed_request(request: pb.EmbedRequest, engine: EmbeddingEngine, max_texts: int) -> EmbedJob:
    """Check every field; raise InvalidArgumentError naming the first offending one."""
    texts = list(request.texts)
    if not texts:
        raise InvalidArgumentError("texts", "must contain at least one text")
    if len(texts) > max_texts:
        raise InvalidArgumentError("texts", f"{len(texts)} texts exceed the limit of {max_texts} per request")
    for index, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgumentError(f"texts[{index}]", "must not be empty or whitespace only")
    if request.input_type not in _INPUT_TYPES:
        raise InvalidArgumentError(
            "input_type",
            "must be INPUT_TYPE_QUERY, INPUT_TYPE_PASSAGE or INPUT_TYPE_RAW; the model is asymmetric, "
            "so there is no default",
        )
    input_type = _INPUT_TYPES[request.input_type]
    titles = list(request.titles)
    if titles and input_type is not InputType.PASSAGE:
        raise InvalidArgumentError("titles", "titles are only allowed with INPUT_TYPE_PASSAGE")
    if titles and len(titles) != len(texts):
        raise InvalidArgumentError("titles", f"{len(titles)} titles for {len(texts)} texts; give one per text or none")
    if request.encoding not in _ENCODINGS:
        raise InvalidArgumentError("encoding", f"unknown encoding {request.encoding}")
    if request.truncation not in _TRUNCATIONS:
        raise InvalidArgumentError("truncation", f"unknown truncation {request.truncation}")
    return EmbedJob(
        prompted_texts=engine.prompts.apply(texts, input_type, titles),
        dimensions=engine.check_dimensions(request.dimensions),
        encoding=_ENCODINGS[request.encoding],
        truncation=_TRUNCATIONS[request.truncation],
    )


def encode_vectors(vectors: np.ndarray, encoding: int) -> list[bytes]:
    """Row bytes in the wire layout documented on scholarembed.v1.Encoding (little-endian)."""
    if encoding == pb.ENCODING_FLOAT16:
        rows = vectors.astype("<f2")
    elif encoding == pb.ENCODING_BINARY:
        rows = np.packbits(vectors > 0, axis=1)  # MSB first, as numpy.packbits
    else:
        rows = vectors.astype("<f4")
    return [row.tobytes() for row in rows]


def to_rpc_status(error: BaseException) -> status_pb2.Status:
    """The one mapping from exceptions to google.rpc.Status."""
    if not isinstance(error, ScholarEmbedError):
        log.error("unexpected error", exc_info=error)
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(error).__name__}")
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    if isinstance(error, InvalidArgumentError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        detail = error_details_pb2.BadRequest(field_violations=[violation])
        status.details.add().Pack(detail)
    elif isinstance(error, QueueFullError):
        seconds = int(error.retry_after_s)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((error.retry_after_s - seconds) * 1e9))
        )
        status.details.add().Pack(retry)
    return status


def status_code(error: BaseException) -> grpc.StatusCode:
    return error.code if isinstance(error, ScholarEmbedError) else grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    status = rpc_status.to_status(to_rpc_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


class TextEmbedder:
    """Tokenize in worker threads, then embed through the shared batcher: the path every servicer uses."""

    def __init__(
        self, engine: EmbeddingEngine, batcher: Batcher, tokenizer_threads: int, max_tokens_per_request: int
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.max_tokens_per_request = max_tokens_per_request
        self._threads = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tokenize")
        self.ready = False  # set once the model is warm; until then calls get UNAVAILABLE

    async def embed(
        self, prompted_texts: list[str], truncation: Truncation, *, wait: bool, field: str = "texts"
    ) -> tuple[np.ndarray, list[TokenizedText]]:
        """(full-dimension unit vectors, token rows), one per text, in order. `field` names the
        request field the texts came from, for errors."""
        if not self.ready:
            raise UnavailableError("model is warming up")
        loop = asyncio.get_running_loop()
        tokenized = await loop.run_in_executor(self._threads, self.engine.tokenize, prompted_texts, truncation)
        total = sum(len(t.ids) for t in tokenized)
        if total > self.max_tokens_per_request:
            raise InvalidArgumentError(
                field, f"{total} tokens in one request exceed the limit of {self.max_tokens_per_request}"
            )
        vectors = await self.batcher.embed([t.ids for t in tokenized], wait=wait)
        return vectors, tokenized

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


async def ordered_stream(
    request_iterator: AsyncIterator[RequestT],
    answer: Callable[[RequestT], Awaitable[ResponseT]],
    window: int,
) -> AsyncIterator[ResponseT]:
    """Answer each request once, in order, with up to `window` requests in progress at once.

    While the window is full the request stream is not read, so HTTP/2 flow control slows the
    client down instead of anything failing. `answer` reports errors in its response, never raises.
    """
    slots = asyncio.Semaphore(window)  # a request holds a slot from being read until its answer is sent
    in_progress: asyncio.Queue[asyncio.Task[ResponseT] | None] = asyncio.Queue()
    messages = aiter(request_iterator)

    async def read_requests() -> None:
        try:
            while True:
                await slots.acquire()
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    return
                await in_progress.put(asyncio.create_task(answer(message)))
        finally:
            await in_progress.put(None)

    reader = asyncio.create_task(read_requests())
    try:
        while (task := await in_progress.get()) is not None:
            yield await task
            slots.release()
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        while not in_progress.empty():
            if (pending := in_progress.get_nowait()) is not None:
                pending.cancel()


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, embedder: TextEmbedder, config: ServerConfig, metrics: Metrics) -> None:
        self._embedder = embedder
        self._engine = embedder.engine
        self._config = config
        self._metrics = metrics

    async def embed(self, request: pb.EmbedRequest, *, wait: bool) -> pb.EmbedResponse:
        """The shared path of Embed and EmbedStream. `wait`: queue full -> wait (True) or raise (False)."""
        job = validate_embed_request(request, self._engine, self._config.max_texts_per_request)
        full, tokenized = await self._embedder.embed(job.prompted_texts, job.truncation, wait=wait)
        vectors = matryoshka(full, job.dimensions)
        token_counts = [len(t.ids) for t in tokenized]
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(data=data, token_count=count, truncated=t.truncated)
                for data, count, t in zip(encode_vectors(vectors, job.encoding), token_counts, tokenized, strict=True)
            ],
            dimensions=job.dimensions,
            encoding=job.encoding,  # type: ignore[arg-type]
            usage=pb.Usage(total_tokens=sum(token_counts)),
            model=self._engine.model_id,
        )

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        with self._metrics.track("Embed", context) as outcome:
            try:
                return await self.embed(request, wait=False)
            except Exception as error:
                outcome.code = status_code(error)
                await abort(context, error)
        raise AssertionError("unreachable: abort raises")

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        with self._metrics.track("EmbedStream", context):
            async for response in ordered_stream(request_iterator, self._answer, self._config.stream_window):
                yield response

    async def _answer(self, message: pb.EmbedStreamRequest) -> pb.EmbedStreamResponse:
        logs.request_id.set(f"{logs.request_id.get()}/{message.request_id}")  # this task's own context
        try:
            if not message.HasField("request"):
                raise InvalidArgumentError("request", "missing: every EmbedStreamRequest carries an EmbedRequest")
            response = await self.embed(message.request, wait=True)
            return pb.EmbedStreamResponse(request_id=message.request_id, response=response)
        except Exception as error:
            return pb.EmbedStreamResponse(request_id=message.request_id, error=to_rpc_status(error))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self._metrics.track("GetModelInfo", context):
            return model_info(self._engine, self._config)


def model_info(engine: EmbeddingEngine, config: ServerConfig) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_id=engine.model_id,
        model_source=engine.source,
        dimensions=engine.dimensions,
        matryoshka_dimensions=list(engine.matryoshka_dims),
        max_tokens=engine.max_tokens,
        dtype=engine.dtype_name,
        device=str(engine.device),
        prompts=pb.Prompts(
            query=engine.prompts.query,
            passage=engine.prompts.passage,
            passage_untitled=engine.prompts.passage_untitled,
        ),
        limits=pb.Limits(
            max_texts_per_request=config.max_texts_per_request,
            max_batch_tokens=config.max_batch_tokens,
            max_message_bytes=config.max_message_bytes,
            max_queue_tokens=config.max_queue_tokens,
        ),
    )
