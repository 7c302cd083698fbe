"""One thin adapter per door: a case in, the door's answer out (vectors, hits, or a failure with its
code and field), and the door's own name for a field. Each speaks its door's wire format with the
door's own client; nothing here checks anything (test_conformance.py does).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from google.protobuf import json_format

from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed.v1 import search_pb2 as spb
from scholarembed.v1 import search_pb2_grpc as spb_grpc

from .cases import MAX_TEXTS, AuthCase, EmbedCase, SearchCase
from .doors import DOORS_BY_NAME, Door


@dataclass
class Vectors:
    vectors: np.ndarray  # float32 or float16 rows, or packed sign bits (uint8) for binary
    token_counts: list[int] | None = None  # None: the door does not report them
    truncated: list[bool] | None = None


@dataclass
class Failure:
    code: str  # gRPC status code name, "USAGE" (a command line's exit 2) or "ValueError" (raised locally)
    field: str | None
    message: str


@dataclass(frozen=True)
class HitView:
    id: str
    score: float
    dense: tuple[int, float] | None = None  # (rank, score) in the dense list of a hybrid search
    lexical: tuple[int, float] | None = None
    title: str = ""
    text: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


Outcome = Vectors | Failure
SearchOutcome = list[list[HitView]] | Failure
FIELD = re.compile(r"^([A-Za-z_.\-]+(?:\[\d+\])?(?:\.[a-z_]+)*): ")


class Adapter:
    """The shared part: the door's declarations, and field names as EmbedRequest's (identity)."""

    def __init__(self, name: str) -> None:
        self.door: Door = DOORS_BY_NAME[name]

    def field(self, neutral: str | None, case: Any = None) -> str | None:
        return neutral

    def embed(self, case: EmbedCase) -> Outcome:
        raise NotImplementedError

    def search(self, case: SearchCase) -> SearchOutcome:
        raise NotImplementedError

    def auth(self, case: AuthCase) -> Outcome:
        raise NotImplementedError


UNKNOWN_ENUM_NUMBER = 99  # how the proto's binary form says an input type it does not have


def _input_type_number(name: str | None) -> int:
    if name is None:
        return pb.INPUT_TYPE_UNSPECIFIED
    return dict(pb.InputType.items()).get(f"INPUT_TYPE_{name.upper()}", UNKNOWN_ENUM_NUMBER)


def _embed_request(case: EmbedCase) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        texts=case.texts,
        input_type=_input_type_number(case.input_type),
        titles=case.titles,
        dimensions=case.dimensions,
        encoding=pb.Encoding.Value(f"ENCODING_{case.encoding.upper()}"),
        truncation=pb.Truncation.Value(f"TRUNCATION_{case.truncation.upper()}"),
    )


def _decoded(response: pb.EmbedResponse) -> Vectors:
    from scholarembed import decode

    result = decode(response)
    return Vectors(result.vectors, result.token_counts, result.truncated)


def _hit_views(results: Any) -> list[list[HitView]]:
    def place(hit: Any, name: str) -> tuple[int, float] | None:
        return (getattr(hit, name).rank, getattr(hit, name).score) if hit.HasField(name) else None

    return [
        [
            HitView(
                h.id,
                h.score,
                place(h, "dense"),
                place(h, "lexical"),
                h.title,
                h.text,
                tuple(sorted(h.metadata.items())),
            )
            for h in result.hits
        ]
        for result in results
    ]


# -- gRPC: the generated stubs ---------------------------------------------------------------------


class GrpcStubs(Adapter):
    def __init__(self, address: str, auth_address: str) -> None:
        import grpc

        super().__init__("grpc")
        self._grpc = grpc
        self._channel = grpc.insecure_channel(address)
        self._auth_channel = grpc.insecure_channel(auth_address)

    def _failure(self, error: Any) -> Failure:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(error)
        field = None
        for detail in status.details if status else ():
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                field = bad_request.field_violations[0].field
        return Failure(error.code().name, field, error.details())

    def embed(self, case: EmbedCase, channel: Any = None, metadata: Any = ()) -> Outcome:
        stub = pb_grpc.EmbeddingServiceStub(channel or self._channel)
        try:
            return _decoded(stub.Embed(_embed_request(case), timeout=60, metadata=metadata))
        except self._grpc.RpcError as error:
            return self._failure(error)

    def search(self, case: SearchCase) -> SearchOutcome:
        try:
            response = spb_grpc.SearchServiceStub(self._channel).Search(case.request, timeout=60)
        except self._grpc.RpcError as error:
            return self._failure(error)
        return _hit_views(response.results)

    def auth(self, case: AuthCase) -> Outcome:
        metadata = [("authorization", f"Bearer {case.token}")] if case.token else []
        return self.embed(EmbedCase("auth", ("protein",)), self._auth_channel, metadata)


# -- HTTP: the openai SDK, and raw JSON ------------------------------------------------------------


def _http_field(neutral: str | None) -> str | None:
    """/v1/embeddings calls EmbedRequest's texts `input`."""
    if neutral is not None and neutral.startswith("texts"):
        return "input" + neutral.removeprefix("texts")
    return neutral


def _openai_extra(case: EmbedCase) -> dict[str, Any]:
    extra: dict[str, Any] = {"truncation": case.truncation}
    if case.input_type is not None:
        extra["input_type"] = case.input_type
    if case.titles:
        extra["titles"] = list(case.titles)
    return extra


def _http_encoding(case: EmbedCase) -> str:
    return "float" if case.encoding == "float32" else case.encoding  # no other is OpenAI's: refused


class OpenAiSdk(Adapter):
    def __init__(self, base_url: str, auth_base_url: str, model: str) -> None:
        super().__init__("http-openai")
        self._base_url, self._auth_base_url, self._model = base_url, auth_base_url, model

    def field(self, neutral: str | None, case: Any = None) -> str | None:
        return _http_field(neutral)

    def _client(self, base_url: str, api_key: str) -> Any:
        import openai

        return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def embed(self, case: EmbedCase, base_url: str | None = None, api_key: str | None = "unused") -> Outcome:
        import openai

        client = self._client(base_url or self._base_url, api_key or "unused")
        try:
            response = client.embeddings.create(
                model=self._model,
                input=list(case.texts),
                encoding_format=_http_encoding(case),  # type: ignore[arg-type]
                extra_body=_openai_extra(case),
                # No key: the SDK's own way of sending no Authorization header at all.
                extra_headers={} if api_key else {"Authorization": openai.omit},
                **({"dimensions": case.dimensions} if case.dimensions else {}),
            )
        except openai.APIStatusError as error:
            body = error.body if isinstance(error.body, dict) else {}
            body = body.get("error", body)
            return Failure(str(body.get("code", "")).upper(), body.get("param"), str(body.get("message")))
        return Vectors(np.array([item.embedding for item in response.data], dtype=np.float32))

    def auth(self, case: AuthCase) -> Outcome:
        return self.embed(EmbedCase("auth", ("protein",)), self._auth_base_url, case.token)


class HttpJson(Adapter):
    def __init__(self, base_url: str, auth_base_url: str, model: str) -> None:
        import httpx

        super().__init__("http-json")
        self._http = httpx.Client(base_url=base_url, timeout=60)
        self._auth_http = httpx.Client(base_url=auth_base_url, timeout=60)
        self._model = model

    def field(self, neutral: str | None, case: Any = None) -> str | None:
        return _http_field(neutral) if isinstance(case, EmbedCase) else neutral

    @staticmethod
    def _failure(response: Any) -> Failure:
        error = response.json()["error"]
        return Failure(error["code"].upper(), error["param"], error["message"])

    def embed(self, case: EmbedCase, http: Any = None, headers: Any = None) -> Outcome:
        body: dict[str, Any] = {"model": self._model, "input": list(case.texts), **_openai_extra(case)}
        body["encoding_format"] = _http_encoding(case)
        if case.dimensions:
            body["dimensions"] = case.dimensions
        response = (http or self._http).post("/v1/embeddings", json=body, headers=headers)
        if response.status_code != 200:
            return self._failure(response)
        return Vectors(np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32))

    def search(self, case: SearchCase) -> SearchOutcome:
        # The proto3 JSON mapping with the proto's field names and enum names, as a web page sends it.
        body = json_format.MessageToDict(case.request, preserving_proto_field_name=True)
        response = self._http.post("/v1/search", json=body)
        if response.status_code != 200:
            return self._failure(response)

        def place(hit: dict[str, Any], name: str) -> tuple[int, float] | None:
            return (hit[name]["rank"], hit[name]["score"]) if name in hit else None

        return [
            [
                HitView(
                    h["id"],
                    h["score"],
                    place(h, "dense"),
                    place(h, "lexical"),
                    h["title"],
                    h["text"],
                    tuple(sorted(h["metadata"].items())),
                )
                for h in result["hits"]
            ]
            for result in response.json()["results"]
        ]

    def auth(self, case: AuthCase) -> Outcome:
        headers = {"Authorization": f"Bearer {case.token}"} if case.token else None
        return self.embed(EmbedCase("auth", ("protein",)), self._auth_http, headers)


# -- Triton: plain tritonclient --------------------------------------------------------------------

TRITON_FIELDS = {"texts": "TEXT", "titles": "TITLE"}


def _triton_field(neutral: str | None) -> str | None:
    if neutral is None:
        return None
    name, bracket, rest = neutral.partition("[")
    return TRITON_FIELDS.get(name, name) + bracket + rest


class TritonRaw(Adapter):
    def __init__(self, address: str) -> None:
        import tritonclient.grpc as triton_grpc

        super().__init__("triton")
        self._triton = triton_grpc
        self._client = triton_grpc.InferenceServerClient(address)

    def field(self, neutral: str | None, case: Any = None) -> str | None:
        return _triton_field(neutral)

    def _rows(self, name: str, values: tuple[str, ...]) -> Any:
        tensor = self._triton.InferInput(name, [len(values), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=np.object_).reshape(-1, 1))
        return tensor

    def embed(self, case: EmbedCase) -> Outcome:
        from tritonclient.utils import InferenceServerException

        inputs = [self._rows("TEXT", case.texts)] + ([self._rows("TITLE", case.titles)] if case.titles else [])
        parameters: dict[str, Any] = {"dimensions": case.dimensions}
        if case.input_type is not None:
            parameters["input_type"] = case.input_type
        if case.encoding != "float32":
            parameters["encoding"] = case.encoding
        if case.truncation != "end":
            parameters["truncation"] = case.truncation
        outputs = [self._triton.InferRequestedOutput(name) for name in ("EMBEDDING", "TOKEN_COUNT", "TRUNCATED")]
        try:
            result = self._client.infer(
                "scholarembed", inputs, outputs=outputs, parameters=parameters, client_timeout=60
            )
        except InferenceServerException as error:
            # The model's errors start with the field; Triton's own checks (batch shapes) name the input.
            message = error.message()
            match = FIELD.match(message) or re.search(r"input '(\w+)'", message)
            return Failure(str(error.status()).removeprefix("StatusCode."), match and match.group(1), message)
        return Vectors(
            result.as_numpy("EMBEDDING"),
            [int(c) for c in result.as_numpy("TOKEN_COUNT").reshape(-1)],
            [bool(t) for t in result.as_numpy("TRUNCATED").reshape(-1)],
        )


# -- the Python client: gRPC and Triton transports -------------------------------------------------


def _client_call(call: Any) -> Outcome | Any:
    """Run a client call; its typed exceptions (and local ValueErrors) as Failures."""
    from scholarembed import ScholarEmbedError

    try:
        return call()
    except ScholarEmbedError as error:
        violation = error.field_violations[0].field if error.field_violations else None
        return Failure(error.code.name, violation, str(error))
    except ValueError as error:
        return Failure("ValueError", None, str(error))


def _client_embed(client: Any, case: EmbedCase) -> Outcome:
    result = _client_call(
        lambda: client.embed(
            list(case.texts),
            input_type=case.input_type,
            titles=list(case.titles) or None,
            dimensions=case.dimensions,
            encoding=case.encoding,
            truncation=case.truncation,
        )
    )
    return result if isinstance(result, Failure) else Vectors(result.vectors, result.token_counts, result.truncated)


class ClientGrpc(Adapter):
    def __init__(self, address: str, auth_address: str) -> None:
        from scholarembed import Client

        super().__init__("client-grpc")
        self._client = Client(address)
        self._auth_address = auth_address

    def embed(self, case: EmbedCase) -> Outcome:
        return _client_embed(self._client, case)

    def search(self, case: SearchCase) -> SearchOutcome:
        request = case.request
        mode = spb.SearchMode.Name(request.mode).removeprefix("SEARCH_MODE_").lower() if request.mode else None
        hits = _client_call(
            lambda: self._client.search_many(
                list(request.queries),
                collection=request.collection,
                top_k=request.top_k,
                dimensions=request.dimensions,
                include_passages=request.include_passages,
                metadata_filter=dict(request.filter),
                mode=mode,
                conditions=list(request.conditions),
                rrf_k=request.hybrid.rrf_k,
                depth=request.hybrid.depth,
            )
        )
        if isinstance(hits, Failure):
            return hits
        return [
            [
                HitView(
                    h.id,
                    h.score,
                    h.dense and (h.dense.rank, h.dense.score),
                    h.lexical and (h.lexical.rank, h.lexical.score),
                    h.title,
                    h.text,
                    tuple(sorted(h.metadata.items())),
                )
                for h in query_hits
            ]
            for query_hits in hits
        ]

    def auth(self, case: AuthCase) -> Outcome:
        from scholarembed import Client

        with Client(self._auth_address, token=case.token) as client:
            return _client_embed(client, EmbedCase("auth", ("protein",)))


class ClientTriton(Adapter):
    def __init__(self, address: str) -> None:
        from scholarembed.triton import TritonClient

        super().__init__("client-triton")
        self._client = TritonClient(address)

    def embed(self, case: EmbedCase) -> Outcome:
        return _client_embed(self._client, case)


# -- the bulk doors, which read files: the command line and Ray -------------------------------------


class Bulk(Adapter):
    """A door that reads a case's texts from a JSONL file: a text is its record's line, the request's
    other fields are `renamed` (the CLI's flags), and no texts is the file itself."""

    renamed: ClassVar[Mapping[str, str]] = {}

    def __init__(self, name: str, work: Path) -> None:
        super().__init__(name)
        self._work = work

    def _path(self, case: EmbedCase) -> Path:
        return self._work / f"{re.sub(r'[^a-z0-9]+', '-', case.name)}.jsonl"

    def input(self, case: EmbedCase) -> Path:
        """The case's texts, one record a line, with their titles (one per text wherever this is used)."""
        path = self._path(case)
        titles = case.titles or ("",) * len(case.texts)
        records = [{"_id": f"t{i}", "text": text, "title": titles[i]} for i, text in enumerate(case.texts)]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return path

    def field(self, neutral: str | None, case: Any = None) -> str | None:
        path = self._path(case)
        if neutral is None:
            return None
        if match := re.fullmatch(r"texts\[(\d+)\]", neutral):
            return f"{path}:{int(match.group(1)) + 1}"
        return str(path) if neutral == "texts" else self.renamed.get(neutral, neutral)


@contextlib.contextmanager
def _logging_kept() -> Any:
    """main() configures the process's logging for a command line; the test process keeps its own."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level


class Cli(Bulk):
    """`scholarembed embed` run by its main(), in this process: argparse, the corpus reader, the engine
    loader or the client, the .npy writer, and the one-line error and exit status."""

    renamed: ClassVar[Mapping[str, str]] = {
        "input_type": "--type", "dimensions": "--dimensions", "encoding": "--encoding", "truncation": "--truncation",
    }  # fmt: skip

    def __init__(self, name: str, work: Path, engine_args: list[str]) -> None:
        super().__init__(name, work)
        self._engine_args = engine_args
        self._runs = 0

    def embed(self, case: EmbedCase) -> Outcome:
        from scholarembed_server.cli import main

        self._runs += 1
        output = self._work / f"vectors-{self._runs}.npy"
        arguments = [
            "--log-level", "WARNING", "embed", "--input", str(self.input(case)),
            "--output", str(output), "--dimensions", str(case.dimensions), "--encoding", case.encoding,
            "--truncation", case.truncation, "--batch-size", str(MAX_TEXTS // 2), "--no-progress",
            *(["--type", case.input_type] if case.input_type else []), *self._engine_args,
        ]  # fmt: skip
        stderr = io.StringIO()
        with _logging_kept(), contextlib.redirect_stderr(stderr):
            try:
                status = main(arguments)
            except SystemExit as exit:  # argparse refuses its usage with exit status 2
                status = exit.code if isinstance(exit.code, int) else 1
        written = stderr.getvalue()
        if status == 0:
            return Vectors(np.load(output))
        if status == 2:
            return Failure("USAGE", None, written.strip().splitlines()[-1])
        errors = [line for line in written.splitlines() if line.startswith("scholarembed embed: error: ")]
        assert len(errors) == 1 and "Traceback" not in written, written  # one line, as documented
        message = errors[0].removeprefix("scholarembed embed: error: ")
        code, _, rest = message.partition(": ")
        match = FIELD.match(rest) or re.match(r"^(\S+): ", rest)
        return Failure(code, match and match.group(1), message)


class Ray(Bulk):
    """`embed_corpus` with engine actors on the case's file; the shards read back in plan order."""

    def __init__(self, work: Path, engine: Any) -> None:
        super().__init__("ray", work)
        self._engine = engine  # the ServerConfig the actors load

    def embed(self, case: EmbedCase) -> Outcome:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from scholarembed_server.errors import ScholarEmbedError
        from scholarembed_server.ray import embed_corpus
        from scholarembed_server.ray.shards import MANIFEST, read_shard

        corpus = self.input(case)
        output = corpus.with_suffix(".shards")
        try:
            embed_corpus(
                str(corpus), str(output), input_type=case.input_type, engine=self._engine,
                dimensions=case.dimensions, encoding=case.encoding, truncation=case.truncation, rows_per_shard=100,
                actors=1, cpus_per_actor=0.5, progress=False,
            )  # fmt: skip
        except ScholarEmbedError as error:
            return Failure(error.code.name, getattr(error, "field", None), str(error))
        names = [shard["name"] for shard in json.loads((output / MANIFEST).read_text())["shards"]]
        shards = [read_shard(str(output), name) for name in names]
        vectors = np.concatenate([shard.vectors for shard in shards])
        column = pq.read_schema(output / f"{names[0]}.parquet").field("vector").type
        if pa.types.is_fixed_size_list(column):  # float vectors: as stored (read_shard widens them to float32)
            vectors = vectors.astype(column.value_type.to_pandas_dtype())
        return Vectors(
            vectors,
            [int(count) for shard in shards for count in shard.token_counts],
            [bool(flag) for shard in shards for flag in shard.truncated],
        )
