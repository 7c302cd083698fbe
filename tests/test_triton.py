"""Triton Inference Server, for real: the bundled tritonserver binary serves model_repository/ on CPU.

The same tiny model and texts go through Triton, the gRPC server and the model card's code; every
door must agree. Bad input is answered per request and the backend stub keeps serving; concurrent
requests are merged by Triton's dynamic batcher.
"""

from __future__ import annotations

import asyncio
import re
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_MATRYOSHKA
from reference import ModelCard, card_passage, card_query, cosine
from tiny_model import WORDS

from scholarembed import Client, FieldViolation, InvalidArgumentError, UnavailableError
from scholarembed.triton import AsyncTritonClient, TritonClient
from scholarembed_server.model.prompts import InputType
from scholarembed_server.triton import launcher as triton_server

pytestmark = pytest.mark.triton

ORACLE = 0.99999
MODEL = triton_server.MODEL_NAME
TEXTS = [
    "protein",
    " ".join(WORDS[:30]),
    "tumor cell immune response",
    " ".join(WORDS[10:14]),
    " ".join(reversed(WORDS[:25])),
    " ".join(WORDS * 3),  # over max_tokens (128): truncated by the engine
]
TITLES = ["A title", "", "Immunology", "", "A title", ""]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    try:
        triton_server.TritonDistribution.find()
    except triton_server.TritonNotFoundError as error:
        pytest.skip(f"no tritonserver: {error}")
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    try:
        server = triton_server.start(
            str(tiny_model_dir), kind="cpu", matryoshka_dims=TINY_MATRYOSHKA, log_path=log_path, ready_timeout=240
        )
    except triton_server.TritonNotFoundError as error:
        pytest.skip(f"tritonserver cannot run here: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def card(tiny_model_dir: Path) -> ModelCard:
    return ModelCard(tiny_model_dir, max_length=128)


@pytest.fixture
def client(triton: Any) -> Any:
    with TritonClient(triton.grpc_address) as client:
        yield client


@pytest.fixture
def raw(triton: Any) -> Any:
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(triton.grpc_address) as raw:
        yield raw


def text_input(texts: list[Any]) -> list[Any]:
    import tritonclient.grpc as triton_grpc

    values = [t if isinstance(t, bytes) else t.encode() for t in texts]
    tensor = triton_grpc.InferInput("TEXT", [len(values), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_).reshape(-1, 1))
    return [tensor]


def submit(raw: Any, texts: list[Any], parameters: dict[str, Any]) -> Future[Any]:
    """One raw inference request in flight; the future holds its result, or its exception."""
    future: Future[Any] = Future()
    raw.async_infer(
        MODEL,
        text_input(texts),
        lambda result, error: future.set_result(error if error is not None else result),
        parameters=parameters,
        client_timeout=120,
    )
    return future


def statistics(raw: Any) -> dict[str, Any]:
    stats = raw.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    return {
        "inferences": int(stats.get("inference_count", 0)),
        "executions": int(stats.get("execution_count", 0)),
        "batch_sizes": {int(b["batch_size"]) for b in stats.get("batch_stats", [])},
    }


def test_served_config_is_the_checked_in_one_on_cpu(raw: Any) -> None:
    served = raw.get_model_config(MODEL, as_json=True)["config"]
    checked_in = (triton_server.DEFAULT_REPOSITORY / MODEL / "config.pbtxt").read_text()
    assert re.findall(r"kind:\s*(KIND_\w+)", checked_in) == ["KIND_GPU"]
    assert [group["kind"] for group in served["instance_group"]] == ["KIND_CPU"]
    # No preferred sizes: Triton writes that as [max_batch_size] in the config it serves.
    assert "preferred_batch_size" not in checked_in
    assert served["dynamic_batching"]["preferred_batch_size"] == [served["max_batch_size"]]
    assert [(i["name"], i["data_type"], i["dims"]) for i in served["input"]] == [("TEXT", "TYPE_STRING", ["1"])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in served["output"]] == [("EMBEDDING", "TYPE_FP32", ["-1"])]


@pytest.mark.parametrize("dimensions", [None, 16])
def test_triton_equals_the_grpc_server_and_the_model_card(client, tiny_server, card, dimensions) -> None:
    with Client(tiny_server.address) as grpc_client:
        expected_queries = grpc_client.embed_queries(TEXTS, dimensions=dimensions)
        expected_passages = grpc_client.embed_passages(TEXTS, titles=TITLES, dimensions=dimensions)
        expected_raw = grpc_client.embed(TEXTS[:2], input_type="raw", dimensions=dimensions).vectors
    queries = client.embed_queries(TEXTS, dimensions=dimensions)
    passages = client.embed_passages(TEXTS, titles=TITLES, dimensions=dimensions)
    raw_vectors = client.embed(TEXTS[:2], input_type="raw", dimensions=dimensions).vectors

    assert queries.dtype == np.float32 and queries.shape == (len(TEXTS), dimensions or 64)
    for got, expected in ((queries, expected_queries), (passages, expected_passages), (raw_vectors, expected_raw)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # one engine: equal up to float rounding
    assert cosine(queries, [card.embed(card_query(t), dimensions) for t in TEXTS]).min() >= ORACLE
    card_passages = [card.embed(card_passage(t, title), dimensions) for t, title in zip(TEXTS, TITLES, strict=True)]
    assert cosine(passages, card_passages).min() >= ORACLE


async def test_async_client_matches_the_sync_client(triton, client) -> None:
    async with AsyncTritonClient(triton.grpc_address) as async_client:
        queries, passages = await asyncio.gather(
            async_client.embed_queries(TEXTS, dimensions=32),
            async_client.embed_passages(TEXTS, titles=TITLES),
        )
        with pytest.raises(InvalidArgumentError):
            await async_client.embed_queries(["ok"], dimensions=48)
    np.testing.assert_allclose(queries, client.embed_queries(TEXTS, dimensions=32), rtol=0, atol=1e-5)
    np.testing.assert_allclose(passages, client.embed_passages(TEXTS, titles=TITLES), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.embed_queries(["ok"], dimensions=48), "dimensions"),
        (lambda c: c.embed_queries(["ok", " \n"]), "texts[1]"),
        (lambda c: c.embed_passages(["a", "b", ""], titles=["t", "u", "t"]), "texts[2]"),
        (lambda c: c.embed(["ok"], input_type="query", titles=["t"]), "titles"),
        (lambda c: c.embed([], input_type="query"), "texts"),
        (lambda c: c.embed(["ok"], input_type="query", encoding="binary"), "encoding"),
    ],
)
def test_client_raises_invalid_argument_naming_the_field(client, call, field) -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        call(client)
    assert raised.value.field_violations[0].field == field
    assert isinstance(raised.value.field_violations[0], FieldViolation)


def test_bad_requests_fail_alone_and_the_stub_keeps_serving(raw) -> None:
    """Bad and good requests in flight together: each bad one gets INVALID_ARG, the good ones vectors."""
    from tritonclient.utils import InferenceServerException

    bad = {
        "missing input_type": (["ok"], {}),
        "unknown input_type": (["ok"], {"input_type": "document"}),
        "numeric input_type": (["ok"], {"input_type": 3}),
        "wrong dimension": (["ok"], {"input_type": "query", "dimensions": 48}),
        "dimension as text": (["ok"], {"input_type": "query", "dimensions": "many"}),
        "empty text": (["ok", ""], {"input_type": "query"}),
        "not UTF-8": ([b"\xff\xfe"], {"input_type": "raw"}),
        "title on a query": (["ok"], {"input_type": "query", "title": "t"}),
    }
    for _round in range(2):  # the second round proves the first left the stub healthy
        good = [submit(raw, [text], {"input_type": "query", "dimensions": 16}) for text in TEXTS[:3]]
        failures = {name: submit(raw, texts, parameters) for name, (texts, parameters) in bad.items()}
        for name, future in failures.items():
            error = future.result(120)
            assert isinstance(error, InferenceServerException), name
            assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error)
        for future in good:
            assert future.result(120).as_numpy("EMBEDDING").shape == (1, 16)
    assert raw.is_model_ready(MODEL)


def test_concurrent_requests_are_batched_without_errors(raw, tiny_engine) -> None:
    """Many one-text requests at once, mixing input types and dimensions: Triton merges them into batches."""
    before = statistics(raw)
    kinds = [("query", 0), ("passage", 32), ("raw", 16), ("query", 16)]
    jobs = [(TEXTS[i % len(TEXTS)], *kinds[i % len(kinds)]) for i in range(64)]
    futures: list[Future[Any]] = [None] * len(jobs)  # type: ignore[list-item]

    def send(indices: range) -> None:
        for i in indices:
            text, input_type, dimensions = jobs[i]
            futures[i] = submit(raw, [text], {"input_type": input_type, "dimensions": dimensions})

    senders = [threading.Thread(target=send, args=(range(k, len(jobs), 4),)) for k in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    results = [future.result(120) for future in futures]
    errors = [result for result in results if isinstance(result, Exception)]
    assert not errors, errors[:3]

    for (text, input_type, dimensions), result in zip(jobs, results, strict=True):
        expected = tiny_engine.encode([text], InputType(input_type), dimensions=dimensions).vectors
        np.testing.assert_allclose(result.as_numpy("EMBEDDING"), expected, rtol=0, atol=1e-5)
    after = statistics(raw)
    inferences, executions = after["inferences"] - before["inferences"], after["executions"] - before["executions"]
    assert inferences == len(jobs)
    assert executions < inferences
    assert max(after["batch_sizes"]) > 1


def test_unreachable_server_is_unavailable() -> None:
    with TritonClient("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError):
        client.embed_queries(["ok"])
