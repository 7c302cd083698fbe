"""The HTTP door, tested with clients nobody here wrote: the official openai SDK, LangChain's
OpenAIEmbeddings and curl, against real servers on loopback, compared with the gRPC door's vectors."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import socket
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import openai
import pytest
from conftest import InProcessServer, wait_for
from langchain_openai import OpenAIEmbeddings
from prometheus_client import generate_latest
from test_security import TOKEN, pki  # noqa: F401  (the module's certificate fixture)
from tiny_model import WORDS

from scholarembed import Client, Passage
from scholarembed.v1 import search_pb2_grpc
from scholarembed_server.lifecycle import Phase

SAME = 0.99999
MAX_TEXTS = 8
MAX_BODY = 64 * 1024
TEXTS = ["protein folding in the cell", "gene expression of tumor cells", "a cohort study of brain outcomes"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    running = InProcessServer(
        tiny_engine,
        http_port=0,
        data_dir=str(tmp_path_factory.mktemp("http-data")),
        max_texts_per_request=MAX_TEXTS,
        http_max_body_bytes=MAX_BODY,
    )
    running.http_url = f"http://127.0.0.1:{running.server.http_port}"
    running.model_id = tiny_engine.model_id
    yield running
    running.stop()


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.address) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def call(
    url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    """One raw HTTP call: (status, headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_openai_sdk_float_vectors_equal_the_grpc_servers(server, sdk, grpc_client) -> None:
    response = sdk.embeddings.create(
        model=server.model_id, input=TEXTS, encoding_format="float", extra_body={"input_type": "query"}
    )
    vectors = np.array([item.embedding for item in response.data])
    assert [item.index for item in response.data] == [0, 1, 2]
    assert cosine(vectors, grpc_client.embed_queries(TEXTS)).min() >= SAME
    assert response.model == server.model_id
    grpc_tokens = sum(grpc_client.embed(TEXTS, input_type="query").token_counts)
    assert response.usage.prompt_tokens == response.usage.total_tokens == grpc_tokens


def test_openai_sdk_base64_with_dimensions_and_titles(server, sdk, grpc_client) -> None:
    titles = ["Folding", "", "Brains"]
    expected = grpc_client.embed_passages(TEXTS, titles=titles, dimensions=32)
    extra_body = {"input_type": "passage", "titles": titles}
    # Asked for explicitly, base64 comes back as the string: little-endian float32, as OpenAI's.
    explicit = sdk.embeddings.create(
        model=server.model_id, input=TEXTS, encoding_format="base64", dimensions=32, extra_body=extra_body
    )
    decoded = np.array([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in explicit.data])
    assert decoded.shape == (3, 32) and cosine(decoded, expected).min() >= SAME
    # Not asked for, the SDK requests base64 anyway and decodes it into floats.
    default = sdk.embeddings.create(model=server.model_id, input=TEXTS, dimensions=32, extra_body=extra_body)
    assert cosine(np.array([item.embedding for item in default.data]), expected).min() >= SAME


def test_model_aliases_choose_the_prompt_and_no_input_type_is_refused(server, sdk, grpc_client) -> None:
    def embed(**kwargs: Any) -> np.ndarray:
        return np.array([item.embedding for item in sdk.embeddings.create(input=TEXTS, **kwargs).data])

    queries, passages = grpc_client.embed_queries(TEXTS), grpc_client.embed_passages(TEXTS)
    assert cosine(embed(model=f"{server.model_id}:query"), queries).min() >= SAME
    assert cosine(embed(model=f"{server.model_id}:passage"), passages).min() >= SAME
    assert cosine(queries, passages).max() < SAME  # the prompts really differ
    # Neither input_type nor an alias: refused, as on every other door, naming both remedies.
    with pytest.raises(openai.BadRequestError) as refused:
        embed(model=server.model_id)
    error = refused.value.body
    assert (error["param"], error["code"]) == ("input_type", "invalid_argument")
    assert "input_type" in error["message"] and f"{server.model_id}:query" in error["message"]


def test_an_operator_can_opt_in_to_a_default_input_type(tiny_engine, grpc_client) -> None:
    server = InProcessServer(tiny_engine, http_port=0, http_default_input_type="passage")
    try:
        status, _, body = call(f"http://127.0.0.1:{server.server.http_port}/v1/embeddings", "POST", {"input": TEXTS})
    finally:
        server.stop()
    assert status == 200
    assert (
        cosine(np.array([item["embedding"] for item in body["data"]]), grpc_client.embed_passages(TEXTS)).min() >= SAME
    )


def test_langchain_openai_embeddings(server, grpc_client) -> None:
    def langchain(alias: str) -> OpenAIEmbeddings:
        # check_embedding_ctx_length=False: send text, not tiktoken ids (tiktoken is OpenAI's tokenizer).
        return OpenAIEmbeddings(
            model=f"{server.model_id}:{alias}",
            base_url=server.http_url + "/v1",
            api_key="unused",
            check_embedding_ctx_length=False,
            max_retries=0,
        )

    documents = langchain("passage").embed_documents(TEXTS)
    query = langchain("query").embed_query(TEXTS[0])
    assert cosine(np.array(documents), grpc_client.embed_passages(TEXTS)).min() >= SAME
    assert cosine(np.array([query]), grpc_client.embed_queries(TEXTS[:1])).min() >= SAME


def test_models_health_and_openapi(server) -> None:
    status, _, models = call(server.http_url + "/v1/models")
    assert status == 200
    assert [card["id"] for card in models["data"]] == [
        server.model_id,
        *(f"{server.model_id}:{a}" for a in ("query", "passage")),
    ]
    assert models["data"][0]["matryoshka_dimensions"] == [64, 32, 16]
    assert call(server.http_url + "/health/live")[2] == {"status": "alive"}
    assert call(server.http_url + "/health/ready")[:3:2] == (200, {"status": "ready"})
    assert call(server.http_url + "/health")[0] == 200
    status, _, error = call(server.http_url + "/v1/nothing")
    assert status == 404 and error["error"]["type"] == "not_found_error"
    openapi = call(server.http_url + "/openapi.json")[2]
    schemas = openapi["components"]["schemas"]
    assert {"EmbeddingsRequest", "EmbeddingsResponse", "ErrorResponse"} <= set(schemas)
    assert {"input", "model", "dimensions", "encoding_format", "input_type", "titles", "truncation", "user"} == set(
        schemas["EmbeddingsRequest"]["properties"]
    )
    assert "429" in openapi["paths"]["/v1/embeddings"]["post"]["responses"]


def test_the_search_schemas_come_from_the_proto(server) -> None:
    """Every field of SearchRequest and SearchResponse, nested messages and enums included, is in the
    OpenAPI document, read from the descriptors: a field added to the proto appears without an edit."""
    from google.protobuf.descriptor import FieldDescriptor

    from scholarembed.v1 import search_pb2

    openapi = call(server.http_url + "/openapi.json")[2]
    schemas = openapi["components"]["schemas"]
    search = openapi["paths"]["/v1/search"]["post"]
    reference = "#/components/schemas/scholarembed.v1."
    assert search["requestBody"]["content"]["application/json"]["schema"] == {"$ref": reference + "SearchRequest"}
    assert search["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": reference + "SearchResponse"}
    pending, seen = [search_pb2.SearchRequest.DESCRIPTOR, search_pb2.SearchResponse.DESCRIPTOR], set()
    while pending:
        message = pending.pop()
        if message.full_name in seen or message.GetOptions().map_entry:
            continue
        seen.add(message.full_name)
        assert set(schemas[message.full_name]["properties"]) == {f.name for f in message.fields}, message.full_name
        for field in message.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                pending.append(field.message_type)
            elif field.type == FieldDescriptor.TYPE_ENUM:
                assert schemas[field.enum_type.full_name]["enum"] == [v.name for v in field.enum_type.values]
    assert {"scholarembed.v1.MetadataCondition", "scholarembed.v1.HybridOptions", "scholarembed.v1.ListRank"} <= seen
    hit = schemas["scholarembed.v1.Hit"]["properties"]
    assert hit["metadata"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert hit["dense"] == {"$ref": reference + "ListRank"}


def test_search_takes_the_protos_json_mapping(server, grpc_client) -> None:
    """/v1/search is SearchRequest in the proto3 JSON mapping: the proto's field names or their
    lowerCamelCase JSON names, enums by name or number; the answer is the Search RPC's, field for field."""
    from google.protobuf import json_format

    from scholarembed.v1 import search_pb2

    passages = [
        Passage(id=f"p{i}", text=" ".join(WORDS[i : i + 10]), metadata={"n": str(i % 2), "year": str(2000 + i)})
        for i in range(30)
    ]
    grpc_client.upsert_passages("http-search", passages, batch_size=MAX_TEXTS)
    request = search_pb2.SearchRequest(
        collection="http-search", queries=["protein gene", "cell"], top_k=5, include_passages=True,
        mode=search_pb2.SEARCH_MODE_HYBRID, hybrid=search_pb2.HybridOptions(rrf_k=10, depth=20), filter={"n": "1"},
        conditions=[search_pb2.MetadataCondition(key="year", range=search_pb2.NumericRange(gte=2005))],
    )  # fmt: skip
    with grpc.insecure_channel(server.address) as channel:
        expected = json_format.MessageToDict(
            search_pb2_grpc.SearchServiceStub(channel).Search(request),
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    proto_names = json_format.MessageToDict(request, preserving_proto_field_name=True)
    json_names = json_format.MessageToDict(request, use_integers_for_enums=True)  # topK, includePassages, mode: 3
    assert "topK" in json_names and json_names["mode"] == 3
    for body in (proto_names, json_names):
        status, _, answer = call(server.http_url + "/v1/search", "POST", body)
        assert status == 200, answer
        assert answer == expected
    assert answer["results"][0]["hits"] and all(hit["dense"] or hit["lexical"] for hit in answer["results"][0]["hits"])


# What is HTTP's own: the body's shape (pydantic) and the model names. The shared validation (empty texts,
# dimensions, limits, titles, ...) is held to the same cases as every door's by tests/conformance/.
QUERY = {"input_type": "query"}
EMBEDDINGS_ERRORS = [
    ("empty string", {"input": "", **QUERY}, 400, "input"),
    ("zero dimension", {"input": "protein", "dimensions": 0, **QUERY}, 400, "dimensions"),
    ("token arrays", {"input": [[1, 2, 3]], **QUERY}, 400, "input"),
    ("not text", {"input": 5, **QUERY}, 400, "input"),
    ("unknown encoding", {"input": "protein", "encoding_format": "float16", **QUERY}, 400, "encoding_format"),
    ("unknown truncation", {"input": "protein", "truncation": "start", **QUERY}, 400, "truncation"),
    ("misspelt field", {"input": "protein", "dimension": 32, **QUERY}, 400, "dimension"),
    ("unknown model", {"input": "protein", "model": "text-embedding-3-small"}, 404, "model"),
    ("alias contradicts", {"input": "protein", "model": "tiny:query", "input_type": "passage"}, 400, "input_type"),
    ("missing input", {"model": "tiny", **QUERY}, 400, "input"),
]


@pytest.mark.parametrize(
    ("body", "status", "param"), [case[1:] for case in EMBEDDINGS_ERRORS], ids=[c[0] for c in EMBEDDINGS_ERRORS]
)
def test_bad_embeddings_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param) -> None:
    if body.get("model") == "tiny:query":
        body = {**body, "model": f"{server.model_id}:query"}
    got_status, _, error = call(server.http_url + "/v1/embeddings", "POST", body)
    assert (got_status, error["error"]["param"]) == (status, param), error
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["message"].startswith(param)
    assert error["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert call(server.http_url + "/v1/embeddings", "POST", {"input": "still serving", "input_type": "query"})[0] == 200


def test_malformed_json_and_large_bodies(server) -> None:
    url = server.http_url + "/v1/embeddings"
    status, _, error = call(url, "POST", b'{"input": ["protein",')
    assert status == 400 and error["error"]["code"] == "invalid_argument"
    assert error["error"]["message"].startswith("malformed JSON")
    big = {"input": ["protein " * 2000] * MAX_TEXTS}
    status, _, error = call(url, "POST", big)
    assert status == 413 and "--http-max-body-bytes" in error["error"]["message"]
    # Without Content-Length (chunked), the limit holds as the body streams in.
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    payload = json.dumps(big).encode()
    chunks = (payload[i : i + 8192] for i in range(0, len(payload), 8192))
    connection.request(
        "POST", "/v1/embeddings", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True
    )
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["type"] == "invalid_request_error"
    connection.close()
    assert call(url, "POST", {"input": "still serving", "input_type": "query"})[0] == 200


SEARCH_ERRORS = [
    ({"collection": "http-search", "queries": ["q"], "top_k": 1, "mode": "dense"}, 400, "mode"),
    ({"collection": "http-search", "queries": ["q"], "top_k": 1, "hybrid": {"rrfK": -1}}, 400, "hybrid.rrf_k"),
    ({"collection": "http-search", "queries": ["q"], "top_k": 1, "filter": {"n": 1}}, 400, "filter['n']"),
    ({"collection": "http-search", "queries": "q", "top_k": 1}, 400, "queries"),
    ({"collection": "http-search", "queries": ["q"], "top_k": 1, "hybrid": 7}, 400, "hybrid"),
    (
        {
            "collection": "http-search",
            "queries": ["q"],
            "top_k": 1,
            "conditions": [{"key": "n", "range": {"gte": "a year"}}],
        },
        400,
        "conditions[0].range.gte",
    ),
    (
        {
            "collection": "http-search",
            "queries": ["q"],
            "top_k": 1,
            "conditions": [{"key": "n", "equals": "1", "any_of": {"values": ["1"]}}],
        },
        400,
        "conditions[0]",
    ),
    ([{"collection": "http-search"}], 400, "body"),
    ({"collection": "bad name!", "queries": ["q"], "top_k": 1}, 400, "collection"),
    ({"collection": "absent", "queries": ["q"], "top_k": 1}, 404, None),
    ({"collection": "http-search", "queries": [], "top_k": 1}, 400, "queries"),
    ({"collection": "http-search", "queries": ["q", ""], "top_k": 1}, 400, "queries[1]"),
    ({"collection": "http-search", "queries": ["q"]}, 400, "top_k"),
    ({"collection": "http-search", "queries": ["q"], "top_k": -1}, 400, "top_k"),
    ({"collection": "http-search", "queries": ["q"], "top_k": 2**40}, 400, "top_k"),
    ({"collection": "http-search", "query": "q", "top_k": 1}, 400, "query"),
    ({"collection": "http-search", "queries": ["q"], "top_k": 1, "dimensions": 7}, 400, "dimensions"),
]


@pytest.mark.parametrize(("body", "status", "param"), SEARCH_ERRORS)
def test_bad_searches_get_the_search_rpcs_errors(server, grpc_client, body, status, param) -> None:
    grpc_client.upsert_passages("http-search", [Passage(id="x", text="protein")])
    got_status, _, error = call(server.http_url + "/v1/search", "POST", body)
    assert (got_status, error["error"]["param"]) == (status, param), error
    if param is not None:
        assert error["error"]["message"].startswith(param + ": ")


def test_a_search_body_that_is_not_json_is_refused_as_an_embeddings_one_is(server) -> None:
    for route in ("/v1/search", "/v1/embeddings"):
        status, _, error = call(server.http_url + route, "POST", b'{"collection": ')
        assert (status, error["error"]["param"], error["error"]["code"]) == (400, None, "invalid_argument")
        assert error["error"]["message"].startswith("malformed JSON at character")


def test_queue_full_is_429_with_retry_after(tiny_engine) -> None:
    # A lone request is always admitted, so the queue is filled by a burst of them.
    server = InProcessServer(tiny_engine, http_port=0, max_queue_tokens=40, max_wait_ms=50)
    url = f"http://127.0.0.1:{server.server.http_port}/v1/embeddings"
    body = {"input": ["protein gene cell"] * 4, "input_type": "passage"}
    try:
        with ThreadPoolExecutor(16) as pool:
            for _ in range(5):
                answers = list(pool.map(lambda _: call(url, "POST", body), range(16)))
                refused = [answer for answer in answers if answer[0] != 200]
                if refused:
                    break
    finally:
        server.stop()
    assert refused, "the queue never filled: nothing to check"
    for status, headers, error in refused:
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert error["error"]["type"] == "rate_limit_error" and error["error"]["code"] == "resource_exhausted"


def test_warming_up_is_503(tiny_engine) -> None:
    server = InProcessServer(tiny_engine, http_port=0)
    url = f"http://127.0.0.1:{server.server.http_port}"
    try:
        server.server.serving.phase = Phase.STARTING  # what warm-up flips: as the server is before its first batch
        assert call(url + "/health/live")[0] == 200
        status, headers, error = call(url + "/v1/embeddings", "POST", {"input": "protein", **QUERY})
        assert status == 503 and headers["Retry-After"] == "1" and "warming up" in error["error"]["message"]
        assert call(url + "/health/ready")[0] == 503
        server.server.serving.phase = Phase.SERVING
        assert call(url + "/health/ready")[0] == 200
        assert call(url + "/v1/search", "POST", {"collection": "c", "queries": ["q"], "top_k": 1})[0] == 501
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/embeddings", {"input": "protein", **QUERY}),
        ("/v1/search", {"collection": "c", "queries": ["q"], "top_k": 1}),
    ],
)
def test_a_call_that_arrives_while_draining_is_503(tiny_engine, tmp_path, route, body) -> None:
    """SIGTERM's drain, for real: a call already in progress (its headers read, its body still coming) when
    the drain begins is answered 503 with Retry-After, then the door closes."""
    server = InProcessServer(tiny_engine, http_port=0, data_dir=str(tmp_path / "data"))
    door = server.server.http
    payload = json.dumps(body).encode()
    head = f"POST {route} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=30) as connection:
        connection.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload[:5])
        wait_for(lambda: door.calls_in_progress == 1, message="the call never reached the door")
        draining = asyncio.run_coroutine_threadsafe(server.server.stop(30), server.loop)
        wait_for(lambda: door.draining, message="the drain never began")
        connection.sendall(payload[5:])
        response = http.client.HTTPResponse(connection)
        response.begin()
        error = json.loads(response.read())["error"]
    draining.result(60)
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(10)
    assert (response.status, response.getheader("Retry-After")) == (503, "1")
    assert error["code"] == "unavailable" and "draining" in error["message"]
    with pytest.raises(urllib.error.URLError):  # drained and closed with the gRPC port
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/health/live", timeout=5)


def test_metrics_label_the_door(server, grpc_client) -> None:
    grpc_client.embed_queries(["protein"])
    call(server.http_url + "/v1/embeddings", "POST", {"input": "protein", "input_type": "query"})
    call(server.http_url + "/v1/embeddings", "POST", {"input": "", "input_type": "query"})
    exposition = generate_latest(server.server.metrics.registry).decode()
    for series in (
        'scholarembed_request_duration_seconds_count{code="OK",door="grpc",rpc="Embed"}',
        'scholarembed_request_duration_seconds_count{code="OK",door="http",rpc="Embed"}',
        'scholarembed_request_duration_seconds_count{code="INVALID_ARGUMENT",door="http",rpc="Embed"}',
    ):
        assert series in exposition


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


def test_curl_over_tls_with_a_token(tiny_engine, pki, token_file, grpc_client) -> None:  # noqa: F811
    server = InProcessServer(
        tiny_engine,
        http_port=0,
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        auth_token_file=str(token_file),
    )
    url = f"https://localhost:{server.server.http_port}/v1/embeddings"

    def curl(*headers: str, body: str = '{"input": ["protein folding"], "input_type": "query"}') -> tuple[int, Any]:
        result = subprocess.run(
            ["curl", "-sS", "--cacert", str(pki["ca"]), "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
             *[part for header in headers for part in ("-H", header)], "-d", body, url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        text, _, code = result.stdout.rpartition("\n")
        return int(code), json.loads(text)

    try:
        status, body = curl(f"Authorization: Bearer {TOKEN}")
        assert status == 200
        vector = np.array([body["data"][0]["embedding"]])
        assert cosine(vector, grpc_client.embed_queries(["protein folding"])).min() >= SAME
        for headers in ((), ("Authorization: Bearer wrong",), (f"Authorization: Basic {TOKEN}",)):
            status, body = curl(*headers)
            assert status == 401 and body["error"]["type"] == "authentication_error", body
        plain = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url.replace("https", "http")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert plain.stdout != "200"  # TLS only: a plain-text request gets no answer
        assert curl(f"Authorization: Bearer {TOKEN}")[0] == 200
    finally:
        server.stop()


def test_mtls_requires_a_client_certificate(tiny_engine, pki) -> None:  # noqa: F811
    server = InProcessServer(
        tiny_engine,
        http_port=0,
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca"]),
    )
    url = f"https://localhost:{server.server.http_port}/health/live"
    try:
        with_certificate = subprocess.run(
            ["curl", "-sS", "--cacert", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key",
             str(pki["client_key"]), url],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert json.loads(with_certificate.stdout) == {"status": "alive"}
        without = subprocess.run(["curl", "-sS", "--cacert", str(pki["ca"]), url], capture_output=True, timeout=60)
        assert without.returncode != 0
    finally:
        server.stop()


def test_probes_open_without_a_token_when_asked(tiny_engine, token_file) -> None:
    server = InProcessServer(tiny_engine, http_port=0, auth_token_file=str(token_file), auth_open_probes=True)
    url = f"http://127.0.0.1:{server.server.http_port}"
    try:
        assert call(url + "/health/ready")[0] == 200
        assert call(url + "/openapi.json")[0] == 200
        assert call(url + "/v1/models")[0] == 401
        assert call(url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        server.stop()


def test_every_answer_carries_the_request_id_back(server) -> None:
    """The caller's x-request-id comes back as a response header, success or error; one is made up and
    returned when the caller sends none, so a failure can be quoted and found in the server's logs."""
    url = server.http_url + "/v1/embeddings"
    body = {"input": "protein", "input_type": "query"}
    status, headers, _ = call(url, "POST", body, headers={"x-request-id": "trace-http-7"})
    assert (status, headers["x-request-id"]) == (200, "trace-http-7")
    status, headers, _ = call(url, "POST", {**body, "input": ""}, headers={"x-request-id": "trace-http-8"})
    assert (status, headers["x-request-id"]) == (400, "trace-http-8")
    status, headers, _ = call(url, "POST", body)
    assert status == 200 and re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"])


async def test_the_doors_connections_send_without_waiting_for_acks() -> None:
    """TCP_NODELAY on every accepted connection (asyncio sets it only on sockets that name IPPROTO_TCP):
    without it, each kept-alive request waited ~40 ms for the client's delayed ACK."""
    from scholarembed_server.http.server import listening_socket

    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    listener = listening_socket("127.0.0.1", 0)
    server = await asyncio.get_running_loop().create_server(Accept, sock=listener)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        transport = await asyncio.wait_for(accepted, 30)
        assert transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        transport.close()
    finally:
        server.close()
        await server.wait_closed()
