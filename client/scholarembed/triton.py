"""TritonClient and AsyncTritonClient: Client's embedding methods, served by Triton Inference Server.

The transport is tritonclient's gRPC client, talking to the `scholarembed` model of
model_repository/. Switching backend is choosing a constructor:

    from scholarembed.triton import TritonClient

    with TritonClient("127.0.0.1:8001") as client:      # instead of Client("127.0.0.1:50051")
        queries = client.embed_queries(["graphene band gap under strain"], dimensions=256)

The methods, arguments, results and exceptions are Client's and AsyncClient's; the model validates
each request as the gRPC server does and names the same fields. What the Triton model cannot serve:
float16 and binary vectors (its output is float32), refused with InvalidArgumentError naming
`encoding`; `EmbedResult.model` is the Triton model's name. tritonclient is the optional extra
`triton` (`pip install 'scholarembed[triton]'`), imported when a Triton client is created.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.rpc import code_pb2, error_details_pb2, status_pb2

from . import errors
from ._client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AsyncEmbedHelpers,
    EmbedHelpers,
    EmbedResult,
    Encoding,
    InputType,
    Truncation,
    _channel_credentials,
    _enum,
)

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MODEL = "scholarembed"
_OUTPUTS = ("EMBEDDING", "TOKEN_COUNT", "TRUNCATED")
# The model's errors start with the field at fault, in its words: an input (TEXT[i], TITLE[i]) or a parameter.
_MODEL_FIELD = re.compile(r"^(TEXT|TITLE|[a-z_]+)(?:\[(\d+)\])?: (.*)$", re.DOTALL)
_FIELDS = {"TEXT": "texts", "TITLE": "titles"}


def _tritonclient_grpc(aio: bool) -> Any:
    try:
        if aio:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.grpc as module
    except ImportError as error:
        raise ImportError("the Triton transport needs tritonclient: pip install 'scholarembed[triton]'") from error
    return module


def _invalid(field: str, description: str) -> errors.ScholarEmbedError:
    """The same InvalidArgumentError a scholarembed server would raise, with its field violation."""
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}")
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return errors.from_status(status)


@dataclass(frozen=True)
class _Part:
    """One inference request: some of the caller's texts (at `indices`), with their titles if any."""

    indices: list[int]
    texts: list[str]
    titles: list[str] | None
    parameters: dict[str, Any]


def _plan(
    texts: Sequence[str],
    input_type: InputType | str,
    titles: Sequence[str] | None,
    dimensions: int | None,
    encoding: Encoding | str,
    truncation: Truncation | str | None,
    max_rows: int,
) -> list[_Part]:
    """Split a call into requests of at most `max_rows` texts. The model validates everything else; only
    what a split needs is checked here: some texts, and one title per text (a TITLE row per TEXT row)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if not texts:
        raise _invalid("texts", "must contain at least one text")
    if titles and len(titles) != len(texts):
        raise _invalid("titles", f"{len(titles)} titles for {len(texts)} texts; give one per text or none")
    parameters: dict[str, Any] = {
        "input_type": _enum(InputType, input_type).name.lower(),
        "dimensions": dimensions or 0,
        "encoding": _enum(Encoding, encoding).name.lower(),
    }
    if truncation is not None:
        parameters["truncation"] = _enum(Truncation, truncation).name.lower()
    parts = []
    for start in range(0, len(texts), max_rows):
        indices = list(range(start, min(start + max_rows, len(texts))))
        parts.append(
            _Part(indices, [texts[i] for i in indices], [titles[i] for i in indices] if titles else None, parameters)
        )
    return parts


def _error(error: Exception, part: _Part | None = None) -> errors.ScholarEmbedError:
    """Map a tritonclient InferenceServerException to the client's typed exception, naming the field as
    the gRPC server would (TEXT[i] of a request is texts[j] of the call)."""
    status_name = str(getattr(error, "status", lambda: None)() or "")
    message_of = getattr(error, "message", None)
    message = str(message_of() if callable(message_of) else error)
    code = getattr(grpc.StatusCode, status_name.removeprefix("StatusCode."), grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.INVALID_ARGUMENT and (match := _MODEL_FIELD.match(message)):
        name, row, description = match.groups()
        field = _FIELDS.get(name, name)
        if row is not None and part is not None and int(row) < len(part.indices):
            field = f"{field}[{part.indices[int(row)]}]"
        return _invalid(field, description)
    return errors.from_status(status_pb2.Status(code=code.value[0], message=message))


class _TritonOptions:
    """What both Triton clients share: connection settings and request building."""

    def __init__(
        self,
        *,
        model: str,
        timeout: float | None,
        tls: bool,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        token: str | None,
        max_message_bytes: int,
        channel_options: Sequence[tuple[str, Any]],
    ) -> None:
        self.model = model
        self.timeout = timeout
        # Triton checks no bearer tokens itself; a gateway in front of it may, as the scholarembed server does.
        self.headers = {"authorization": f"Bearer {token}"} if token else None
        self.credentials = (
            _channel_credentials(root_certificates, private_key, certificate_chain)
            if tls or root_certificates or certificate_chain
            else None
        )
        defaults: dict[str, Any] = {
            "grpc.max_receive_message_length": max_message_bytes,
            "grpc.max_send_message_length": max_message_bytes,
        }
        # gRPC takes the first value given for a key, so the caller's options replace these, not follow them.
        self.channel_args = list({**defaults, **dict(channel_options)}.items())
        self.max_rows: int | None = None  # the model's max_batch_size, read on first use

    @staticmethod
    def max_rows_from(config: dict[str, Any]) -> int:
        return max(1, int(config["config"].get("max_batch_size", 1)))

    def inputs(self, module: Any, part: _Part) -> list[Any]:
        tensors = []
        for name, values in (("TEXT", part.texts), ("TITLE", part.titles)):
            if values is not None:
                tensor = module.InferInput(name, [len(values), 1], "BYTES")
                tensor.set_data_from_numpy(
                    np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(-1, 1)
                )
                tensors.append(tensor)
        return tensors

    def infer_arguments(self, module: Any, part: _Part, timeout: float | None) -> dict[str, Any]:
        return {
            "model_name": self.model,
            "inputs": self.inputs(module, part),
            "outputs": [module.InferRequestedOutput(name) for name in _OUTPUTS],
            "parameters": part.parameters,
            "client_timeout": timeout if timeout is not None else self.timeout,
            "headers": self.headers,
        }

    def result(self, parts: list[_Part], outcomes: list[Any]) -> EmbedResult:
        """Vectors in the caller's order; the first failed request (in input order) raises."""
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise _error(outcome, part) if isinstance(outcome, Exception) else outcome
        embeddings, token_counts, truncated = ([outcome.as_numpy(name) for outcome in outcomes] for name in _OUTPUTS)
        vectors = np.concatenate(embeddings)  # parts hold consecutive texts, in order
        counts = [int(c) for c in np.concatenate(token_counts).reshape(-1)]
        return EmbedResult(
            vectors=vectors,
            token_counts=counts,
            truncated=[bool(t) for t in np.concatenate(truncated).reshape(-1)],
            dimensions=vectors.shape[1],
            encoding=Encoding.FLOAT32,
            model=self.model,
            total_tokens=sum(counts),
        )


class TritonClient(EmbedHelpers):
    """Blocking client for the Triton model; Client's embedding methods. Use as a context manager, or close().

    A call's texts go out as concurrent requests of at most the model's max_batch_size texts, which
    Triton's dynamic batcher merges with everyone else's.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._module = _tritonclient_grpc(aio=False)
        self._options = _TritonOptions(
            model=model,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        self._client = self._module.InferenceServerClient(
            target, creds=self._options.credentials, channel_args=self._options.channel_args
        )

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _max_rows(self) -> int:
        if self._options.max_rows is None:
            try:
                config = self._client.get_model_config(
                    self._options.model,
                    headers=self._options.headers,
                    as_json=True,
                    client_timeout=self._options.timeout,
                )
            except Exception as error:
                raise _error(error) from None
            self._options.max_rows = self._options.max_rows_from(config)
        return self._options.max_rows

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
        parts = _plan(texts, input_type, titles, dimensions, encoding, truncation, self._max_rows())
        futures: list[Future[Any]] = [Future() for _ in parts]
        for part, future in zip(parts, futures, strict=True):

            def settle(result: Any, error: Exception | None, future: Future[Any] = future) -> None:
                future.set_result(error if error is not None else result)

            try:
                self._client.async_infer(callback=settle, **self._options.infer_arguments(self._module, part, timeout))
            except Exception as error:
                future.set_result(error)
        return self._options.result(parts, [future.result() for future in futures])


class AsyncTritonClient(AsyncEmbedHelpers):
    """asyncio twin of TritonClient, with the same methods as coroutines."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._module = _tritonclient_grpc(aio=True)
        self._options = _TritonOptions(
            model=model,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            max_message_bytes=max_message_bytes,
            channel_options=channel_options,
        )
        self._client = self._module.InferenceServerClient(
            target, creds=self._options.credentials, channel_args=self._options.channel_args
        )

    async def __aenter__(self) -> AsyncTritonClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def _max_rows(self) -> int:
        if self._options.max_rows is None:
            try:
                config = await self._client.get_model_config(
                    self._options.model,
                    headers=self._options.headers,
                    as_json=True,
                    client_timeout=self._options.timeout,
                )
            except Exception as error:
                raise _error(error) from None
            self._options.max_rows = self._options.max_rows_from(config)
        return self._options.max_rows

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
        parts = _plan(texts, input_type, titles, dimensions, encoding, truncation, await self._max_rows())
        outcomes = await asyncio.gather(
            *(self._client.infer(**self._options.infer_arguments(self._module, part, timeout)) for part in parts),
            return_exceptions=True,
        )
        return self._options.result(parts, list(outcomes))
