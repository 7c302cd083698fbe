"""Triton Python backend model: a thin door to scholarembed's EmbeddingEngine.

`execute` validates every request with the validation every door shares (`validate_embed_request`,
which also applies the prompts), then groups the valid ones by dimensions: each group is tokenized by
the engine in one call, the token rows of all groups go through one
forward pass (`EmbeddingEngine.forward_planned`, split only by the token budget), and each group's
vectors are cut to its Matryoshka size. Prompting, pooling, normalising and truncation are the
engine's; nothing here repeats them.

Contract: one response per request, in order. Bad input gets an INVALID_ARG error for that request
alone. `execute` never raises: in Triton 2.51 a stub whose `execute` raised stays "ready" and fails
every later request, so anything unexpected becomes an INTERNAL error on the requests it touched.
"""

from __future__ import annotations

import json
import os
import traceback
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from scholarembed.v1 import embedding_pb2
from scholarembed_server.config import ServerConfig
from scholarembed_server.embedder import validate_embed_request
from scholarembed_server.engine import EmbeddingEngine, matryoshka
from scholarembed_server.errors import InvalidArgumentError

ENV_PREFIX = "SCHOLAREMBED_"
OUTPUT = "EMBEDDING"
INPUT_TYPES = {
    "query": embedding_pb2.INPUT_TYPE_QUERY,
    "passage": embedding_pb2.INPUT_TYPE_PASSAGE,
    "raw": embedding_pb2.INPUT_TYPE_RAW,
}
MAX_TEXTS_PER_REQUEST = ServerConfig.max_texts_per_request  # the gRPC server's default limit


@dataclass
class Job:
    """A validated request: its prompted texts and its output size."""

    index: int
    prompted_texts: list[str]
    dimensions: int


def setting(parameters: dict[str, Any], key: str) -> str:
    """A config.pbtxt parameter, overridden by SCHOLAREMBED_<KEY> when that is set and not empty."""
    return os.environ.get(ENV_PREFIX + key.upper()) or parameters.get(key, {}).get("string_value", "")


def parse_request(index: int, request: Any, engine: EmbeddingEngine) -> Job:
    """Turn a Triton request into an EmbedRequest and validate it as every door does (`validate_embed_request`):
    only what is Triton's own, the UTF-8 tensor and the JSON parameters, is checked here."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as error:
        raise InvalidArgumentError("parameters", f"not valid JSON: {error}") from None
    texts = []
    for row, value in enumerate(pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)):
        try:
            texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"TEXT[{row}]", "must be UTF-8") from None
    requested_type = parameters.get("input_type")
    dimensions = parameters.get("dimensions", 0)
    if isinstance(dimensions, str) and dimensions.strip().isdigit():
        dimensions = int(dimensions)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise InvalidArgumentError("dimensions", f"must be an integer, got {dimensions!r}")
    title = parameters.get("title")
    if title is not None and not isinstance(title, str):
        raise InvalidArgumentError("title", f"must be a string, got {title!r}")
    embed_request = embedding_pb2.EmbedRequest(
        texts=texts,
        input_type=INPUT_TYPES.get(requested_type, embedding_pb2.INPUT_TYPE_UNSPECIFIED)
        if isinstance(requested_type, str)
        else embedding_pb2.INPUT_TYPE_UNSPECIFIED,
        titles=[title] * len(texts) if title else [],
        dimensions=dimensions,
    )
    try:
        job = validate_embed_request(embed_request, engine, MAX_TEXTS_PER_REQUEST)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(triton_field(error.field), error.description) from None
    return Job(index=index, prompted_texts=job.prompted_texts, dimensions=job.dimensions)


def triton_field(field: str) -> str:
    """An EmbedRequest field in this model's own words: texts[i] is row i of TEXT, titles is the title parameter."""
    if field.startswith("texts"):
        return "TEXT" + field.removeprefix("texts")
    return {"titles": "title"}.get(field, field)


def error_response(error: BaseException) -> Any:
    if isinstance(error, InvalidArgumentError):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
        )
    pb_utils.Logger.log_error(
        "scholarembed: unexpected error\n" + "".join(traceback.format_exception(type(error), error, None))
    )
    message = f"internal error: {type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        device = "cpu" if args["model_instance_kind"] == "CPU" else f"cuda:{args['model_instance_device_id']}"
        dims = setting(parameters, "matryoshka_dims")
        self.engine = EmbeddingEngine.load(
            setting(parameters, "model"),
            device=device,
            dtype=setting(parameters, "dtype") or "auto",
            max_tokens=int(setting(parameters, "max_tokens") or 0) or None,
            matryoshka_dims=[int(d) for d in dims.split(",") if d.strip()] or None,
        )
        self.max_batch_tokens = int(setting(parameters, "max_batch_tokens") or 16384)
        self.engine.runner.warmup()
        pb_utils.Logger.log_info(
            f"scholarembed: {self.engine.model_id} from {self.engine.model.source} on {self.engine.model.device} "
            f"({self.engine.model.dtype_name}), dimensions {list(self.engine.matryoshka_dims)}, "
            f"max {self.engine.max_tokens} tokens: ready"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; never raises."""
        responses: list[Any] = [None] * len(requests)
        try:
            self._execute(requests, responses)
        except Exception as error:
            unanswered = [i for i, response in enumerate(responses) if response is None]
            for index in unanswered:
                responses[index] = error_response(error)
        return responses

    def _execute(self, requests: list[Any], responses: list[Any]) -> None:
        groups: defaultdict[int, list[Job]] = defaultdict(list)  # by output dimensions
        for index, request in enumerate(requests):
            try:
                job = parse_request(index, request, self.engine)
            except Exception as error:
                responses[index] = error_response(error)
                continue
            groups[job.dimensions].append(job)

        # Tokenize per group; then one forward pass over the rows of every group.
        tokenized_groups: list[tuple[list[Job], list[list[int]]]] = []
        for jobs in groups.values():
            try:
                tokenized = self.engine.tokenize([text for job in jobs for text in job.prompted_texts])
                tokenized_groups.append((jobs, [t.ids for t in tokenized]))
            except Exception as error:
                for job in jobs:
                    responses[job.index] = error_response(error)
        if not tokenized_groups:
            return
        vectors = self.engine.runner.forward_planned(
            [row for _, rows in tokenized_groups for row in rows], self.max_batch_tokens
        )

        start = 0
        for jobs, rows in tokenized_groups:
            group_vectors = matryoshka(vectors[start : start + len(rows)], jobs[0].dimensions)
            start += len(rows)
            offset = 0
            for job in jobs:
                count = len(job.prompted_texts)
                job_vectors = np.ascontiguousarray(group_vectors[offset : offset + count], dtype=np.float32)
                offset += count
                responses[job.index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, job_vectors)])
