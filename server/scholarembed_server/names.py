"""The names the doors that speak strings use for the proto's enums (HTTP's JSON, Triton's parameters, the
CLI's flags, Ray's arguments), and EmbedRequests built from them, in one place.

Light on purpose (protobuf only, no torch): the CLI builds its parser from these on a client-only install.
"""

from __future__ import annotations

from collections.abc import Sequence

from scholarembed.v1 import embedding_pb2 as pb

from .errors import InvalidArgumentError

INPUT_TYPE_NAMES = {"query": pb.INPUT_TYPE_QUERY, "passage": pb.INPUT_TYPE_PASSAGE, "raw": pb.INPUT_TYPE_RAW}
ENCODING_NAMES = {"float32": pb.ENCODING_FLOAT32, "float16": pb.ENCODING_FLOAT16, "binary": pb.ENCODING_BINARY}
TRUNCATION_NAMES = {"end": pb.TRUNCATION_END, "error": pb.TRUNCATION_ERROR}


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
