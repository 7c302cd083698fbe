"""The embedding path every door shares: validate an EmbedRequest, tokenize, batch, pool, encode.

A door (gRPC, HTTP, ...) converts its own wire format into a `scholarembed.v1.EmbedRequest`, calls
`TextEmbedder.embed_request`, and converts the EmbedResponse back. Validation, prompting, the token
limits and the batcher live here once, so a bad input gets the same words on every door. Errors are
the domain exceptions of `errors`; each door maps them to its own status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from scholarembed.v1 import embedding_pb2 as pb

from .batcher import Batcher
from .config import ServerConfig
from .engine import EmbeddingEngine, InputType, TokenizedText, Truncation, matryoshka
from .errors import InvalidArgumentError, UnavailableError

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
# The names the doors that speak strings use (HTTP's JSON, Triton's parameters, the CLI's flags, Ray's
# arguments), mapped to the proto's values in one place.
INPUT_TYPE_NAMES = {"query": pb.INPUT_TYPE_QUERY, "passage": pb.INPUT_TYPE_PASSAGE, "raw": pb.INPUT_TYPE_RAW}
ENCODING_NAMES = {"float32": pb.ENCODING_FLOAT32, "float16": pb.ENCODING_FLOAT16, "binary": pb.ENCODING_BINARY}
TRUNCATION_NAMES = {"end": pb.TRUNCATION_END, "error": pb.TRUNCATION_ERROR}


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


def named_embed_request(
    texts: Sequence[str],
    *,
    input_type: str | None,
    titles: Sequence[str] = (),
    dimensions: int = 0,
    encoding: str = "float32",
    truncation: str = "end",
) -> pb.EmbedRequest:
    """An EmbedRequest from the names the string-speaking doors use ("query", "float16", "error", ...);
    an unknown or missing name is InvalidArgumentError naming the field. The request still goes through
    `validate_embed_request` like any other."""
    if input_type is None:
        raise InvalidArgumentError(
            "input_type",
            "required: query, passage or raw; the model is asymmetric (queries and passages get different "
            "prompts), so there is no default",
        )
    return pb.EmbedRequest(
        texts=texts,
        input_type=_named(INPUT_TYPE_NAMES, "input_type", input_type),  # type: ignore[arg-type]
        titles=titles,
        dimensions=dimensions,
        encoding=_named(ENCODING_NAMES, "encoding", encoding),  # type: ignore[arg-type]
        truncation=_named(TRUNCATION_NAMES, "truncation", truncation),  # type: ignore[arg-type]
    )


def _named(values: dict[str, int], field: str, name: str) -> int:
    if name not in values:
        raise InvalidArgumentError(field, f"{name!r} is not one of {', '.join(values)}")
    return values[name]


def encode_vectors(vectors: np.ndarray, encoding: int) -> list[bytes]:
    """Row bytes in the wire layout documented on scholarembed.v1.Encoding (little-endian)."""
    if encoding == pb.ENCODING_FLOAT16:
        rows = vectors.astype("<f2")
    elif encoding == pb.ENCODING_BINARY:
        rows = np.packbits(vectors > 0, axis=1)  # MSB first, as numpy.packbits
    else:
        rows = vectors.astype("<f4")
    return [row.tobytes() for row in rows]


class TextEmbedder:
    """Tokenize in worker threads, then embed through the shared batcher: the path every door uses."""

    def __init__(self, engine: EmbeddingEngine, batcher: Batcher, config: ServerConfig) -> None:
        self.engine = engine
        self.batcher = batcher
        self.max_texts_per_request = config.max_texts_per_request
        self.max_tokens_per_request = config.max_tokens_per_request
        self._threads = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="tokenize")
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

    async def embed_request(self, request: pb.EmbedRequest, *, wait: bool) -> pb.EmbedResponse:
        """Validate and answer one EmbedRequest. `wait`: queue full -> wait (True) or raise (False)."""
        job = validate_embed_request(request, self.engine, self.max_texts_per_request)
        full, tokenized = await self.embed(job.prompted_texts, job.truncation, wait=wait)
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
            model=self.engine.model_id,
        )

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


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
