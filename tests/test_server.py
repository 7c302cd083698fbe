"""End to end over a real socket: `scholarembed serve` in a subprocess, the typed client and raw stubs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import metrics_address, scrape_metric
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reference import ModelCard, card_passage, card_query, cosine
from tiny_model import WORDS

import scholarembed
from scholarembed import AsyncClient, Client, Encoding
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc

ORACLE = 0.99999
TEXTS = [
    "protein",
    " ".join(WORDS[:30]),
    "tumor cell immune response",
    " ".join(WORDS[10:14]),
    " ".join(reversed(WORDS[:25])),
]


@pytest.fixture(scope="module")
def card(tiny_model_dir):
    return ModelCard(tiny_model_dir, max_length=128)


@pytest.fixture
def client(tiny_server):
    with Client(tiny_server.address) as client:
        yield client


def test_health_and_reflection(tiny_server) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "scholarembed.v1.EmbeddingService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in next(responses).list_services_response.service}
        assert {"scholarembed.v1.EmbeddingService", "grpc.health.v1.Health"} <= services


def test_model_info(client, tiny_model_dir) -> None:
    info = client.model_info()
    assert info.model_source == str(tiny_model_dir)
    assert info.dimensions == 64
    assert info.matryoshka_dimensions == (64, 32, 16)
    assert info.max_tokens == 128
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert info.query_prompt == "task: search result | query: {text}"
    assert info.passage_untitled_prompt == "title: none | text: {text}"
    assert info.max_texts_per_request == 64


@pytest.mark.parametrize("dimensions", [None, 32, 16])
def test_queries_and_passages_equal_the_model_card(client, card, dimensions) -> None:
    queries = client.embed_queries(TEXTS, dimensions=dimensions)
    titles = ["A title", "", "Immunology", "", ""]
    passages = client.embed_passages(TEXTS, titles=titles, dimensions=dimensions)
    assert queries.dtype == np.float32
    assert queries.shape == (len(TEXTS), dimensions or 64)
    assert cosine(queries, [card.embed(card_query(t), dimensions) for t in TEXTS]).min() >= ORACLE
    expected = [card.embed(card_passage(t, title), dimensions) for t, title in zip(TEXTS, titles, strict=True)]
    assert cosine(passages, expected).min() >= ORACLE


def test_raw_stub_bytes_are_little_endian_float32(tiny_server, tiny_model_dir, card) -> None:
    """What a client in any language does: raw stubs, then decode the bytes by the documented layout."""
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response = stub.Embed(pb.EmbedRequest(texts=TEXTS[:2], input_type=pb.INPUT_TYPE_RAW, dimensions=32))
    assert response.encoding == pb.ENCODING_FLOAT32
    assert response.dimensions == 32
    assert response.usage.total_tokens == sum(e.token_count for e in response.embeddings)
    assert response.model == str(tiny_model_dir.resolve())  # a local folder's id is its path (--served-model-name)
    for text, embedding in zip(TEXTS[:2], response.embeddings, strict=True):
        assert len(embedding.data) == 4 * 32
        vector = np.frombuffer(embedding.data, dtype="<f4")
        assert cosine(vector, card.embed(text, 32)).min() >= ORACLE


def test_float16_and_binary_encodings(client) -> None:
    full = client.embed(TEXTS, input_type="query").vectors
    half = client.embed(TEXTS, input_type="query", encoding="float16")
    assert half.vectors.dtype == np.float16
    np.testing.assert_allclose(half.vectors.astype(np.float32), full, atol=1e-3)
    binary = client.embed(TEXTS, input_type="query", encoding=Encoding.BINARY, dimensions=16)
    assert binary.vectors.dtype == np.uint8 and binary.vectors.shape == (len(TEXTS), 2)
    small = client.embed_queries(TEXTS, dimensions=16)
    np.testing.assert_array_equal(np.unpackbits(binary.vectors, axis=1).astype(bool), small > 0)


def test_truncation_is_flagged(client) -> None:
    result = client.embed([" ".join(WORDS * 4), "short"], input_type="raw")
    assert result.truncated == [True, False]
    assert result.token_counts[0] == 128
    assert result.total_tokens == sum(result.token_counts)


def test_embed_stream_keeps_order_and_matches_unary(client) -> None:
    texts = [f"{WORDS[i % len(WORDS)]} study {i}" for i in range(300)]
    streamed = np.concatenate(list(client.embed_stream(iter(texts), batch_size=32, max_in_flight=4, dimensions=32)))
    unary = np.concatenate([client.embed_passages(texts[i : i + 64], dimensions=32) for i in range(0, 300, 64)])
    assert streamed.shape == (300, 32)
    assert cosine(streamed, unary).min() >= ORACLE


def test_embed_stream_takes_title_text_pairs(client) -> None:
    pairs = [("Cell biology", "protein gene"), ("", "tumor")]
    streamed = np.concatenate(list(client.embed_stream(pairs)))
    expected = client.embed_passages(["protein gene", "tumor"], titles=["Cell biology", ""])
    assert cosine(streamed, expected).min() >= ORACLE


def test_stream_reports_errors_in_band_and_goes_on(tiny_server) -> None:
    good = pb.EmbedRequest(texts=["protein"], input_type=pb.INPUT_TYPE_QUERY)
    requests = [
        pb.EmbedStreamRequest(request_id="a", request=good),
        pb.EmbedStreamRequest(request_id="b", request=pb.EmbedRequest(texts=["x"])),  # no input type
        pb.EmbedStreamRequest(request_id="c"),  # no request at all
        pb.EmbedStreamRequest(request_id="d", request=pb.EmbedRequest(texts=["x"], input_type=1, dimensions=5)),
        pb.EmbedStreamRequest(request_id="e", request=good),
    ]
    with grpc.insecure_channel(tiny_server.address) as channel:
        responses = list(pb_grpc.EmbeddingServiceStub(channel).EmbedStream(iter(requests)))
    assert [r.request_id for r in responses] == ["a", "b", "c", "d", "e"]
    assert [r.HasField("error") for r in responses] == [False, True, True, True, False]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "input_type" in responses[1].error.message
    assert "request" in responses[2].error.message
    assert "dimensions" in responses[3].error.message
    assert responses[4].response.embeddings[0].data == responses[0].response.embeddings[0].data


def test_stream_error_surfaces_as_typed_exception_with_request_id(client) -> None:
    with pytest.raises(scholarembed.InvalidArgumentError) as error:
        list(client.embed_stream(["fine", "   "], batch_size=1))
    assert error.value.request_id == "1"
    assert error.value.field_violations[0].field == "texts[0]"


def test_concurrent_clients_get_their_own_vectors(tiny_server, card) -> None:
    texts = [" ".join(WORDS[i : i + 1 + i % 17]) for i in range(48)]

    def one(text: str) -> np.ndarray:
        with Client(tiny_server.address) as client:
            return client.embed_queries([text])[0]

    with ThreadPoolExecutor(16) as pool:
        vectors = list(pool.map(one, texts))
    assert cosine(np.stack(vectors), [card.embed(card_query(t)) for t in texts]).min() >= ORACLE


def test_async_client_has_the_same_methods(tiny_server, client) -> None:
    async def run() -> tuple[np.ndarray, np.ndarray, list[np.ndarray], int]:
        async with AsyncClient(tiny_server.address) as aclient:
            queries = await aclient.embed_queries(TEXTS, dimensions=32)
            passages = await aclient.embed_passages(TEXTS, titles=["t"] * len(TEXTS))
            chunks = [chunk async for chunk in aclient.embed_stream(TEXTS, batch_size=2)]
            info = await aclient.model_info()
            return queries, passages, chunks, info.dimensions

    queries, passages, chunks, dimensions = asyncio.run(run())
    assert dimensions == 64
    assert cosine(queries, client.embed_queries(TEXTS, dimensions=32)).min() >= ORACLE
    assert cosine(passages, client.embed_passages(TEXTS, titles=["t"] * len(TEXTS))).min() >= ORACLE
    assert cosine(np.concatenate(chunks), client.embed_passages(TEXTS)).min() >= ORACLE


def test_sync_and_async_clients_expose_the_same_methods() -> None:
    public = {name for name in dir(Client) if not name.startswith("_")}
    assert public == {name for name in dir(AsyncClient) if not name.startswith("_")}


def test_metrics_move_with_the_calls_made(tiny_server) -> None:
    """Not only the names: counters and histograms move by what these calls did (nothing else runs now)."""
    address = metrics_address(tiny_server)
    names = {
        "tokens": ("scholarembed_embedded_tokens_total", None),
        "texts": ("scholarembed_embedded_texts_total", None),
        "batches": ("scholarembed_batch_size_count", None),
        "batched_texts": ("scholarembed_batch_size_sum", None),
        "efficiency_count": ("scholarembed_batch_padding_efficiency_count", None),
        "efficiency_sum": ("scholarembed_batch_padding_efficiency_sum", None),
        "efficiency_at_most_1": ("scholarembed_batch_padding_efficiency_bucket", {"le": "1.0"}),
        "padded_tokens": ("scholarembed_batch_tokens_sum", None),
        "forward_passes": ("scholarembed_forward_duration_seconds_count", None),
        "embed_ok": ("scholarembed_request_duration_seconds_count", {"door": "grpc", "rpc": "Embed", "code": "OK"}),
        "embed_invalid": (
            "scholarembed_request_duration_seconds_count",
            {"door": "grpc", "rpc": "Embed", "code": "INVALID_ARGUMENT"},
        ),
    }

    def snapshot() -> dict[str, float]:
        return {key: scrape_metric(address, name, labels) for key, (name, labels) in names.items()}

    before = snapshot()
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        responses = [
            stub.Embed(pb.EmbedRequest(texts=TEXTS, input_type=pb.INPUT_TYPE_QUERY)),
            stub.Embed(pb.EmbedRequest(texts=TEXTS[:2], input_type=pb.INPUT_TYPE_RAW)),
        ]
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(texts=[" "], input_type=pb.INPUT_TYPE_QUERY))
    moved = {key: value - before[key] for key, value in snapshot().items()}
    texts = len(TEXTS) + 2
    assert moved["tokens"] == sum(r.usage.total_tokens for r in responses)
    assert moved["texts"] == texts
    assert 1 <= moved["batches"] <= texts and moved["batched_texts"] == texts
    assert moved["efficiency_count"] == moved["batches"] == moved["efficiency_at_most_1"]  # every one <= 1
    assert 0 < moved["efficiency_sum"] <= moved["efficiency_count"]
    assert moved["padded_tokens"] >= moved["tokens"]  # real tokens never exceed padded ones
    assert moved["forward_passes"] == moved["batches"]
    assert (moved["embed_ok"], moved["embed_invalid"]) == (2, 1)
    assert scrape_metric(address, "scholarembed_queue_tokens") == 0


def test_threads_share_one_client(client) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                assert client.embed_queries(["protein"]).shape == (1, 64)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
