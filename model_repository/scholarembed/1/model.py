"""Triton Python backend model: a thin door to scholarembed's embedding path.

Each request becomes a `scholarembed.v1.EmbedRequest` (TEXT rows, optional TITLE rows, and the
parameters input_type, dimensions, truncation and encoding), answered by the server's own path run in
this process (`InProcessEmbedder`): the same validation and limits (texts and tokens per request), the
same batcher (token-budget batches, out-of-memory halving: a text that cannot fit alone fails its
request, the others are answered), prompts, pooling and encodings as the gRPC server. Its settings are
serve's (`ServerConfig`), from config.pbtxt's parameters and SCHOLAREMBED_<SETTING> variables.

`execute` stays synchronous: Triton runs one `execute` at a time per model instance (an `async def
execute` too, which only a decoupled model, one that cannot answer the plain ModelInfer call, may run
concurrently). So `execute` hands all of its requests, one dynamic batch, to the batcher at once, on
the embedder's own event loop, and waits for their answers.

Contract: one response per request, in order. `execute` never raises: in Triton 2.51 a stub whose
`execute` raised stays "ready" and fails every later request. Errors map to Triton's codes in one
place, `triton_code`; gRPC codes Triton cannot express are documented there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
import triton_python_backend_utils as pb_utils

from scholarembed import decode
from scholarembed.v1 import embedding_pb2
from scholarembed_server.config import ServerConfig, add_arguments, from_arguments
from scholarembed_server.names import named_embed_request
from scholarembed_server.errors import InvalidArgumentError, ScholarEmbedError
from scholarembed_server.inprocess import InProcessEmbedder

ENV_PREFIX = "SCHOLAREMBED_"
PARAMETERS = ("input_type", "dimensions", "truncation", "encoding")
# EmbedRequest fields in this model's words: its input tensors.
TRITON_FIELDS = {"texts": "TEXT", "titles": "TITLE"}


def server_config(parameters: dict[str, Any]) -> ServerConfig:
    """serve's settings: config.pbtxt's parameters (those that name a ServerConfig field), each overridden
    by SCHOLAREMBED_<FIELD> when that is set (the flags' own environment defaults)."""
    import argparse

    names = {field.name for field in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(parameters) - names)
    if unknown:  # a misspelt setting would silently keep its default
        raise ValueError(f"config.pbtxt parameters {unknown} are not settings of serve (ServerConfig fields)")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [
        f"--{name.replace('_', '-')}={value['string_value']}"
        for name, value in parameters.items()
        if value.get("string_value") and not os.environ.get(ENV_PREFIX + name.upper())
    ]
    return from_arguments(parser.parse_args(flags))


def triton_code(code: grpc.StatusCode) -> Any:
    """The one mapping of this door's errors: a domain error's gRPC code as a Triton error code (which
    Triton's gRPC frontend turns back into INVALID_ARGUMENT, UNAVAILABLE, ...; its HTTP frontend into
    400, 503, ...). Triton has no RESOURCE_EXHAUSTED: the one such error a request can meet here is a
    text too large for the accelerator even alone (the batcher waits for room, so the queue is never
    "full"), which no retry fixes, so it is INVALID_ARG, its message saying so. FAILED_PRECONDITION and
    anything else is INTERNAL. (pb_utils.TritonError exists only once the stub runs, so this is no table.)"""
    error = pb_utils.TritonError
    return {
        grpc.StatusCode.INVALID_ARGUMENT: error.INVALID_ARG,
        grpc.StatusCode.RESOURCE_EXHAUSTED: error.INVALID_ARG,
        grpc.StatusCode.UNAVAILABLE: error.UNAVAILABLE,
        grpc.StatusCode.NOT_FOUND: error.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED: error.UNSUPPORTED,
    }.get(code, error.INTERNAL)


def triton_field(field: str) -> str:
    """texts[i] is row i of TEXT, titles[i] of TITLE; the parameters keep their names."""
    name, bracket, rest = field.partition("[")
    return TRITON_FIELDS.get(name, name) + bracket + rest


def strings(request: Any, name: str) -> list[str] | None:
    """A BYTES input's rows as text, or None when the request does not send the input."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = []
    for row, value in enumerate(tensor.as_numpy().reshape(-1)):
        try:
            values.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            raise InvalidArgumentError(f"{name}[{row}]", "must be UTF-8") from None
    return values


def embed_request(request: Any) -> embedding_pb2.EmbedRequest:
    """The request's tensors and parameters as an EmbedRequest; only what is Triton's own (UTF-8 tensors,
    JSON parameters, unknown parameters) is checked here, the rest by the shared validation."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as error:
        raise InvalidArgumentError("parameters", f"not valid JSON: {error}") from None
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:  # a misspelt parameter ("dimension") is refused, not silently ignored
        raise InvalidArgumentError(unknown[0], f"unknown parameter; this model takes {', '.join(PARAMETERS)}")
    encoding = parameters.get("encoding", "float32")
    if encoding != "float32":
        raise InvalidArgumentError(
            "encoding", f"{encoding!r}: EMBEDDING is TYPE_FP32, so this model serves float32 only"
        )
    dimensions = parameters.get("dimensions", 0)
    if isinstance(dimensions, str) and dimensions.strip().isdigit():
        dimensions = int(dimensions)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 0:
        raise InvalidArgumentError("dimensions", f"must be a non-negative integer, got {dimensions!r}")
    return named_embed_request(
        strings(request, "TEXT") or [],
        input_type=parameters.get("input_type"),
        titles=strings(request, "TITLE") or [],
        dimensions=dimensions,
        encoding=encoding,
        truncation=parameters.get("truncation", "end"),
    )


def error_response(error: BaseException) -> Any:
    """A failed request's response: a Triton error with the code of `triton_code`."""
    if not isinstance(error, ScholarEmbedError):
        pb_utils.Logger.log_error(
            "scholarembed: unexpected error\n" + "".join(traceback.format_exception(type(error), error, None))
        )
        message = f"internal error: {type(error).__name__}: {error}"
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
        )
    if isinstance(error, InvalidArgumentError):
        message = f"{triton_field(error.field)}: {error.description}"
    else:
        message = str(error)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, triton_code(error.code)))


def inference_response(response: embedding_pb2.EmbedResponse) -> Any:
    result = decode(response)
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(result.vectors, dtype=np.float32)),
            pb_utils.Tensor("TOKEN_COUNT", np.array(result.token_counts, dtype=np.int32).reshape(-1, 1)),
            pb_utils.Tensor("TRUNCATED", np.array(result.truncated, dtype=np.bool_).reshape(-1, 1)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        device = "cpu" if args["model_instance_kind"] == "CPU" else f"cuda:{args['model_instance_device_id']}"
        self.embedder = InProcessEmbedder(dataclasses.replace(server_config(parameters), device=device))
        engine = self.embedder.engine
        pb_utils.Logger.log_info(
            f"scholarembed: {engine.model_id} from {engine.model.source} on {engine.model.device} ({engine.model.dtype_name}), "
            f"dimensions {list(engine.matryoshka_dims)}, max {engine.max_tokens} tokens: ready"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; never raises."""
        answers: list[Future[embedding_pb2.EmbedResponse] | BaseException] = []
        for request in requests:
            try:
                answers.append(self.embedder.submit(embed_request(request)))
            except Exception as error:
                answers.append(error)
        responses = []
        for answer in answers:
            try:
                if isinstance(answer, BaseException):
                    raise answer
                responses.append(inference_response(answer.result()))
            except Exception as error:
                responses.append(error_response(error))
        return responses

    def finalize(self) -> None:
        self.embedder.close()
