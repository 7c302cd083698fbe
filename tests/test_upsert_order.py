"""UpsertPassages commits in stream order whatever fails in between, over a real server.

Requests of one stream are embedded concurrently, so a small request finishes embedding before a large
one read ahead of it. Whatever fails in between (here: requests refused before their turn to commit),
the stored version of an id must be the last acknowledged one, as if the stream had been run one
request at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import InProcessServer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_model import WORDS

from scholarembed.v1 import search_pb2 as pb
from scholarembed.v1 import search_pb2_grpc as pb_grpc

SHARED_IDS = ("x", "y", "z")  # ids that several requests of a stream write
FAILURES = ("empty text", "duplicate id", "unknown index kind", "no passages")  # each refused before its turn
DEADLINE_S = 120


@pytest.fixture(scope="module")
def server(tiny_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tiny_engine, data_dir=str(tmp_path_factory.mktemp("upsert-order") / "data"))
    yield server
    server.stop()


# One request: ok or refused, the shared ids it writes, and how many passages of its own it carries
# (a large request is slow to embed, so the requests after it finish embedding first).
requests = st.tuples(
    st.sampled_from(("ok", "ok", *FAILURES)),
    st.lists(st.sampled_from(SHARED_IDS), min_size=1, max_size=3, unique=True),
    st.sampled_from((0, 0, 20, 100)),
)


def upsert_request(position: int, outcome: str, ids: list[str], own: int) -> pb.UpsertPassagesRequest:
    passages = [pb.Passage(id=id_, text=f"version {position} of {id_}") for id_ in ids]
    passages += [pb.Passage(id=f"own-{position}-{n}", text=" ".join(WORDS[n % 40 : n % 40 + 8])) for n in range(own)]
    request = pb.UpsertPassagesRequest(request_id=str(position), passages=passages)
    if outcome == "empty text":
        request.passages[0].text = ""
    elif outcome == "duplicate id":
        request.passages.append(pb.Passage(id=ids[0], text="a second passage with the same id"))
    elif outcome == "unknown index kind":
        request.options.index_kind = 99  # type: ignore[assignment]
    elif outcome == "no passages":
        del request.passages[:]
    return request


@settings(max_examples=15, deadline=None)
@given(stream=st.lists(requests, min_size=2, max_size=8))
@example(stream=[("ok", ["x"], 200), ("empty text", ["x"], 0), ("ok", ["x"], 0)])  # found from outside
def test_upserts_commit_in_stream_order_whatever_fails_in_between(server: InProcessServer, stream: list[Any]) -> None:
    collection = f"order-{uuid.uuid4().hex}"
    messages = [upsert_request(position, *request) for position, request in enumerate(stream)]
    for message in messages:
        message.collection = collection
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        responses = list(stub.UpsertPassages(iter(messages), timeout=DEADLINE_S))
        assert [r.request_id for r in responses] == [m.request_id for m in messages]
        for (outcome, _, _), message, response in zip(stream, messages, responses, strict=True):
            if outcome == "ok":
                assert response.upserted == len(message.passages), response
            else:
                assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], response
        expected = {}  # id -> the text of the last request that was acknowledged, in stream order
        for (outcome, _, _), message in zip(stream, messages, strict=True):
            if outcome == "ok":
                expected.update((p.id, p.text) for p in message.passages if p.id in SHARED_IDS)
        if not expected:
            return  # nothing was stored, so the collection was never created
        stored = stub.GetPassages(pb.GetPassagesRequest(collection=collection, ids=SHARED_IDS), timeout=DEADLINE_S)
    assert {p.id: p.text for p in stored.passages} == expected
