"""Triton Inference Server, for real: the bundled tritonserver binary serves model_repository/ on CPU
(the `triton` fixture of conftest.py, shared with the conformance suite, which holds Triton to the
same cases as every other door).

Here, what is Triton's own: the served configuration, bad requests answered per request while the
backend stub keeps serving, concurrent requests merged by Triton's dynamic batcher into batches of the
shared batcher, the async client, and an unreachable server.
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
from reference import ModelCard, card_passage, card_query, cosine
from tiny_model import WORDS

from scholarembed import InvalidArgumentError, UnavailableError
from scholarembed.triton import AsyncTritonClient, TritonClient
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
    assert [(i["name"], i["data_type"], i["dims"], i.get("optional", False)) for i in served["input"]] == [
        ("TEXT", "TYPE_STRING", ["1"], False),
        ("TITLE", "TYPE_STRING", ["1"], True),
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in served["output"]] == [
        ("EMBEDDING", "TYPE_FP32", ["-1"]),
        ("TOKEN_COUNT", "TYPE_INT32", ["1"]),
        ("TRUNCATED", "TYPE_BOOL", ["1"]),
    ]


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


def test_bad_requests_fail_alone_and_the_stub_keeps_serving(raw) -> None:
    """Bad and good requests in flight together: each bad one gets INVALID_ARG naming its field in the
    model's words, the good ones vectors."""
    from tritonclient.utils import InferenceServerException

    bad = {
        "missing input_type": (["ok"], {}, "input_type"),
        "unknown input_type": (["ok"], {"input_type": "document"}, "input_type"),
        "numeric input_type": (["ok"], {"input_type": 3}, "input_type"),
        "wrong dimension": (["ok"], {"input_type": "query", "dimensions": 48}, "dimensions"),
        "dimension as text": (["ok"], {"input_type": "query", "dimensions": "many"}, "dimensions"),
        "empty text": (["ok", ""], {"input_type": "query"}, "TEXT[1]"),
        "not UTF-8": ([b"\xff\xfe"], {"input_type": "raw"}, "TEXT[0]"),
        "misspelt parameter": (["ok"], {"input_type": "query", "dimension": 16}, "dimension"),
        "float16": (["ok"], {"input_type": "query", "encoding": "float16"}, "encoding"),
        "unknown truncation": (["ok"], {"input_type": "query", "truncation": "start"}, "truncation"),
    }
    for _round in range(2):  # the second round proves the first left the stub healthy
        good = [submit(raw, [text], {"input_type": "query", "dimensions": 16}) for text in TEXTS[:3]]
        failures = {name: submit(raw, texts, parameters) for name, (texts, parameters, _) in bad.items()}
        for name, future in failures.items():
            error = future.result(120)
            assert isinstance(error, InferenceServerException), name
            assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error)
            assert error.message().startswith(bad[name][2] + ": "), (name, error.message())
        for future in good:
            assert future.result(120).as_numpy("EMBEDDING").shape == (1, 16)
    assert raw.is_model_ready(MODEL)


def test_concurrent_requests_are_batched_without_errors(raw, card) -> None:
    """Many one-text requests at once, mixing input types and dimensions: Triton merges them into batches,
    which the model hands to the shared batcher together."""
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

    prompts = {"query": card_query, "passage": card_passage, "raw": str}
    for (text, input_type, dimensions), result in zip(jobs, results, strict=True):
        expected = card.embed(prompts[input_type](text), dimensions)
        assert cosine(result.as_numpy("EMBEDDING"), expected).min() >= ORACLE
    after = statistics(raw)
    inferences, executions = after["inferences"] - before["inferences"], after["executions"] - before["executions"]
    assert inferences == len(jobs)
    assert executions < inferences
    assert max(after["batch_sizes"]) > 1


def test_unreachable_server_is_unavailable() -> None:
    with TritonClient("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError):
        client.embed_queries(["ok"])
