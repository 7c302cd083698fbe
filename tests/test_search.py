"""SearchService end to end: a real server on a real data folder, over real sockets, with faults."""

from __future__ import annotations

import itertools
import resource
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import TINY_MATRYOSHKA, ServerProcess, metrics_address, scrape_metric, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_model import WORDS

import scholarembed
from scholarembed import Client, Passage
from scholarembed.v1 import search_pb2 as pb
from scholarembed.v1 import search_pb2_grpc as pb_grpc


def corpus(count: int, prefix: str = "p") -> list[Passage]:
    rng = np.random.default_rng(count)
    return [
        Passage(
            id=f"{prefix}{i}",
            text=" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))),
            title=" ".join(rng.choice(WORDS, size=2)) if i % 2 else "",
            metadata={"year": str(2000 + i % 5), "venue": "nature" if i % 3 == 0 else "cell"},
        )
        for i in range(count)
    ]


def brute_force(client: Client, passages: list[Passage], queries: list[str], dimensions: int) -> np.ndarray:
    """Every query's cosine with every passage, from the server's own embeddings, computed here with numpy:
    the full-size passage vectors cut to `dimensions` and re-normalised, as the README says search does."""
    passage_vectors = np.concatenate(
        [
            client.embed_passages([p.text for p in passages[i : i + 64]], [p.title for p in passages[i : i + 64]])
            for i in range(0, len(passages), 64)
        ]
    )
    head = passage_vectors[:, :dimensions].astype(np.float64)
    head /= np.linalg.norm(head, axis=1, keepdims=True)
    return client.embed_queries(queries, dimensions=dimensions) @ head.T


def assert_exact_top_k(hits: list, scores: np.ndarray, ids: list[str], k: int, tolerance: float) -> None:
    """`hits` are the k best passages, best first, each with its own score: tie-tolerant, never vacuous.

    Passages whose scores differ by less than the storage precision may swap places, but every hit must
    carry its own passage's score, the hits must be in descending order, and no passage left out may
    beat the last hit by more than the tolerance.
    """
    column = {passage_id: j for j, passage_id in enumerate(ids)}
    hit_ids = [h.id for h in hits]
    assert len(hit_ids) == k and len(set(hit_ids)) == k
    np.testing.assert_allclose([h.score for h in hits], [scores[column[i]] for i in hit_ids], atol=tolerance)
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))
    left_out = np.delete(scores, [column[i] for i in hit_ids])
    assert left_out.max() <= hits[-1].score + tolerance
    np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:k], atol=tolerance)


@pytest.fixture(scope="module")
def search_server(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("search")
    server = ServerProcess(
        folder, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA,
        "--data-dir", str(folder / "data"), "--max-top-k", "200", "--metrics-port", "0",
    )  # fmt: skip
    server.metrics_address = metrics_address(server)
    yield server
    server.stop()


@pytest.fixture
def client(search_server):
    with Client(search_server.address) as client:
        yield client


@pytest.mark.parametrize(("storage", "tolerance"), [("float32", 1e-5), ("float16", 2e-3)])
@pytest.mark.parametrize("dimensions", [64, 16])
def test_search_is_exact_at_every_matryoshka_dimension(client, storage, tolerance, dimensions) -> None:
    name = f"exact-{storage}-{dimensions}"
    passages = corpus(150)
    acks = list(client.upsert_stream(name, passages, batch_size=40, vector_storage=storage))
    assert [a.upserted for a in acks] == [40, 40, 40, 30]
    assert acks[0].ids == [p.id for p in passages[:40]]
    queries = ["protein gene", "tumor cell immune response", "the effect of drug dose on survival"]
    expected = brute_force(client, passages, queries, dimensions)
    results = client.search_many(queries, collection=name, top_k=10, dimensions=dimensions)
    for hits, scores in zip(results, expected, strict=True):
        assert_exact_top_k(hits, scores, [p.id for p in passages], 10, tolerance)
    info = client.get_collection(name)
    assert (info.passage_count, info.dimensions, info.index_kind, info.vector_storage) == (150, 64, "flat", storage)


def test_upsert_replaces_and_delete_removes(client) -> None:
    client.upsert_passages("replace", corpus(20))
    client.upsert_passages("replace", [Passage(id="p3", text="zebrafish neuron survival", title="New")])
    assert client.get_collection("replace").passage_count == 20
    [stored] = client.get_passages("replace", ["p3"])
    assert (stored.text, stored.title) == ("zebrafish neuron survival", "New")
    hits = client.search("zebrafish neuron survival", collection="replace", top_k=20, include_passages=True)
    assert [h.text for h in hits].count("zebrafish neuron survival") == 1
    assert client.delete_passages("replace", ["p3", "p4", "nope"]) == 2
    assert client.get_collection("replace").passage_count == 18
    hits = client.search("zebrafish neuron survival", collection="replace", top_k=50)
    assert {"p3", "p4"}.isdisjoint(h.id for h in hits) and len(hits) == 18
    assert [p.id for p in client.get_passages("replace", ["p5", "p3", "p1"])] == ["p5", "p1"]


def test_include_passages_and_metadata_filter(client) -> None:
    passages = corpus(60)
    client.upsert_passages("filtered", passages)
    hits = client.search(
        "protein",
        collection="filtered",
        top_k=60,
        include_passages=True,
        metadata_filter={"year": "2002", "venue": "cell"},
    )
    expected = {p.id for p in passages if p.metadata == {"year": "2002", "venue": "cell"}}
    assert {h.id for h in hits} == expected
    by_id = {p.id: p for p in passages}
    for hit in hits:
        assert (hit.title, hit.text, dict(hit.metadata)) == (
            by_id[hit.id].title,
            by_id[hit.id].text,
            by_id[hit.id].metadata,
        )
    assert client.search("protein", collection="filtered", metadata_filter={"year": "1999"}) == []
    assert all(h.text == "" for h in client.search("protein", collection="filtered"))


def test_collections_are_listed_and_deleted(client) -> None:
    client.upsert_passages("doomed", corpus(5))
    assert "doomed" in [c.name for c in client.list_collections()]
    assert client.delete_collection("doomed") == 5
    assert "doomed" not in [c.name for c in client.list_collections()]
    with pytest.raises(scholarembed.NotFoundError):
        client.get_collection("doomed")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.search("x", collection="missing"), None),
        (lambda c: c.delete_passages("missing", ["a"]), None),
        (lambda c: c.get_passages("missing", ["a"]), None),
        (lambda c: c.delete_collection("missing"), None),
    ],
)
def test_unknown_collection_is_not_found(client, call, field) -> None:
    with pytest.raises(scholarembed.NotFoundError):
        call(client)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SearchRequest(collection="filtered", queries=["x"], top_k=0), "top_k"),
        (pb.SearchRequest(collection="filtered", queries=["x"], top_k=201), "top_k"),
        (pb.SearchRequest(collection="filtered", queries=[], top_k=5), "queries"),
        (pb.SearchRequest(collection="filtered", queries=["ok", " "], top_k=5), "queries[1]"),
        (pb.SearchRequest(collection="filtered", queries=["x"], top_k=5, dimensions=20), "dimensions"),
        (pb.SearchRequest(collection="bad name!", queries=["x"], top_k=5), "collection"),
    ],
)
def test_bad_search_requests_name_the_field(search_server, client, request_, field) -> None:
    client.upsert_passages("filtered", corpus(3))
    with grpc.insecure_channel(search_server.address) as channel, pytest.raises(grpc.RpcError) as raised:
        pb_grpc.SearchServiceStub(channel).Search(request_, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


@pytest.mark.parametrize(
    ("passages", "field"),
    [
        ([pb.Passage(id="", text="x")], "passages[0].id"),
        ([pb.Passage(id="a", text="x"), pb.Passage(id="a", text="y")], "passages[1].id"),
        ([pb.Passage(id="a", text="  ")], "passages[0].text"),
        ([], "passages"),
    ],
)
def test_bad_upserts_are_reported_in_band_and_store_nothing(search_server, client, passages, field) -> None:
    requests = [
        pb.UpsertPassagesRequest(collection="inband", request_id="bad", passages=passages),
        pb.UpsertPassagesRequest(collection="inband", request_id="good", passages=[pb.Passage(id="ok", text="fine")]),
    ]
    with grpc.insecure_channel(search_server.address) as channel:
        responses = list(pb_grpc.SearchServiceStub(channel).UpsertPassages(iter(requests)))
    assert [r.request_id for r in responses] == ["bad", "good"]
    assert responses[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert field in responses[0].error.message
    assert responses[1].upserted == 1 and not responses[1].HasField("error")
    assert client.get_passages("inband", ["a"]) == []


def test_search_stream_keeps_order_with_in_band_errors(search_server, client) -> None:
    client.upsert_passages("streamed", corpus(30))
    good = pb.SearchRequest(collection="streamed", queries=["protein", "gene"], top_k=3)
    requests = [
        pb.SearchStreamRequest(request_id="1", request=good),
        pb.SearchStreamRequest(request_id="2", request=pb.SearchRequest(collection="nope", queries=["x"], top_k=3)),
        pb.SearchStreamRequest(request_id="3", request=good),
    ]
    with grpc.insecure_channel(search_server.address) as channel:
        responses = list(pb_grpc.SearchServiceStub(channel).SearchStream(iter(requests)))
    assert [r.request_id for r in responses] == ["1", "2", "3"]
    assert responses[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert [len(r.hits) for r in responses[2].response.results] == [3, 3]
    streamed = list(client.search_stream(["protein", "gene", "cell"], collection="streamed", top_k=3, batch_size=2))
    assert [h.id for h in streamed[2]] == [h.id for h in client.search("cell", collection="streamed", top_k=3)]


def test_data_survives_a_restart(tmp_path, tiny_model_dir) -> None:
    args = ("--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--data-dir", str(tmp_path / "data"))
    server = ServerProcess(tmp_path, *args)
    with Client(server.address) as client:
        client.upsert_passages("kept", corpus(80), index_kind="hnsw")
        before = client.search_many(["protein", "tumor"], collection="kept", top_k=5, dimensions=32)
    server.stop()
    server = ServerProcess(tmp_path, *args)
    with Client(server.address) as client:
        assert client.get_collection("kept").passage_count == 80
        assert client.get_collection("kept").index_kind == "hnsw"
        after = client.search_many(["protein", "tumor"], collection="kept", top_k=5, dimensions=32)
    server.stop()
    assert [[h.id for h in q] for q in before] == [[h.id for h in q] for q in after]


def test_kill_9_during_ingestion_loses_nothing_acknowledged(tmp_path, tiny_model_dir) -> None:
    args = ("--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--data-dir", str(tmp_path / "data"))
    server = ServerProcess(tmp_path, *args)
    passages = corpus(3000, prefix="k")
    acked: list[str] = []
    with Client(server.address) as client, pytest.raises(scholarembed.ScholarEmbedError):
        for ack in client.upsert_stream("crash", passages, batch_size=25, max_in_flight=8):
            acked += ack.ids
            if len(acked) >= 500:
                server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    server.stop()

    server = ServerProcess(tmp_path, *args)
    with Client(server.address) as client:
        stored = {
            p.id
            for i in range(0, 3000, 1000)
            for p in client.get_passages("crash", [p.id for p in passages[i : i + 1000]])
        }
        count = client.get_collection("crash").passage_count
        assert set(acked) <= stored  # every acknowledged passage survived
        assert count == len(stored)  # the database and the vectors agree
        batches = [{p.id for p in passages[i : i + 25]} for i in range(0, 3000, 25)]
        assert all(batch <= stored or batch.isdisjoint(stored) for batch in batches)  # no half-stored request
        hits = client.search_many([passages[0].text], collection="crash", top_k=count)
        assert {h.id for h in hits[0]} == stored  # every stored passage is searchable
        client.upsert_passages("crash", passages[:50])  # and the collection still takes writes
    server.stop()


CLIENT_SCRIPT = """
import sys
from scholarembed import Client, Passage
passages = [Passage(id=f"c{i}", text=f"protein gene study number {i}") for i in range(100000)]
with Client(sys.argv[1]) as client:
    for ack in client.upsert_stream("abandoned", passages, batch_size=50, max_in_flight=8):
        print(ack.request_id, flush=True)
"""


def test_client_killed_mid_stream_leaves_no_half_committed_request(search_server, client) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, search_server.address], stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):
        process.stdout.readline()

    def streams_ended() -> float:
        labels = {"rpc": "UpsertPassages", "code": "CANCELLED"}
        return scrape_metric(search_server.metrics_address, "scholarembed_request_duration_seconds_count", labels)

    ended_before = streams_ended()
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    wait_for(
        lambda: streams_ended() > ended_before,
        message="the server never saw the killed client's stream end",
    )
    # Index writes run one at a time in order, so a write sent now runs after any commit still in progress.
    client.delete_passages("abandoned", ["no such id"])
    ids = [f"c{i}" for i in range(2000)]
    stored = {p.id for p in client.get_passages("abandoned", ids)}
    assert len(stored) >= 250
    assert all(set(ids[i : i + 50]) <= stored or set(ids[i : i + 50]).isdisjoint(stored) for i in range(0, 2000, 50))
    assert client.get_collection("abandoned").passage_count == len(stored)


def test_failed_write_is_reported_and_not_acknowledged(tmp_path, tiny_model_dir) -> None:
    """RLIMIT_FSIZE makes every write past 600 kB fail, as a full disk would."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    args = ("--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--data-dir", str(tmp_path / "data"),
            "--vector-storage", "float32")  # fmt: skip
    server = ServerProcess(tmp_path, *args, preexec_fn=limit_file_size)
    passages = corpus(4000, prefix="f")
    acked: list[str] = []
    with Client(server.address) as client:
        with pytest.raises(scholarembed.InternalError, match="write failed"):
            for ack in client.upsert_stream("full", passages, batch_size=100, max_in_flight=1):
                acked += ack.ids
        assert acked  # some writes succeeded before the "disk" filled up
        assert client.get_collection("full").passage_count == len(acked)
        stored = {p.id for p in client.get_passages("full", [p.id for p in passages[: len(acked) + 100]])}
        assert stored == set(acked)
        top_k = min(len(acked), 1000)
        assert len(client.search("protein", collection="full", top_k=top_k)) == top_k  # still serving
    server.stop()


def test_milvus_backend_serves_the_same_results(tmp_path, tiny_model_dir, client) -> None:
    """The same API over milvus-lite (--index-uri): same hits as the embedded store at every dimension."""
    server = ServerProcess(
        tmp_path, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA,
        "--index-uri", str(tmp_path / "milvus.db"),
    )  # fmt: skip
    passages = corpus(60)
    client.upsert_passages("parity", passages, vector_storage="float32")
    try:
        with Client(server.address) as milvus:
            assert milvus.upsert_passages("parity", passages) == 60
            assert milvus.get_collection("parity").passage_count == 60
            for dimensions in (64, 16):
                expected = client.search_many(
                    ["protein", "tumor cell"], collection="parity", top_k=5, dimensions=dimensions
                )
                got = milvus.search_many(["protein", "tumor cell"], collection="parity", top_k=5, dimensions=dimensions)
                for want, have in zip(expected, got, strict=True):
                    np.testing.assert_allclose([h.score for h in have], [h.score for h in want], atol=1e-5)
            hits = milvus.search("protein", collection="parity", top_k=60, metadata_filter={"venue": "nature"})
            assert {h.id for h in hits} == {p.id for p in passages if p.metadata["venue"] == "nature"}
    finally:
        server.stop()


search_requests = st.builds(
    pb.SearchRequest,
    collection=st.sampled_from(["filtered", "missing", "", "bad name!", "x" * 65]),
    queries=st.lists(st.text(max_size=30), max_size=5),
    top_k=st.sampled_from([0, 1, 5, 200, 201, 2**32 - 1]),
    dimensions=st.sampled_from([0, 16, 17, 64, 4096]),
    include_passages=st.booleans(),
    filter=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
upsert_requests = st.builds(
    pb.UpsertPassagesRequest,
    collection=st.sampled_from(["fuzzed", "", "bad name!"]),
    passages=st.lists(
        st.builds(
            pb.Passage,
            id=st.text(max_size=8),
            text=st.text(max_size=20),
            title=st.text(max_size=5),
            metadata=st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        ),
        max_size=4,
    ),
    options=st.builds(pb.CollectionOptions, index_kind=st.integers(0, 5), vector_storage=st.integers(0, 4)),
)
ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0], 0}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(search=search_requests, upsert=upsert_requests)
def test_arbitrary_search_and_upsert_requests_never_produce_internal(search_server, search, upsert) -> None:
    with grpc.insecure_channel(search_server.address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        try:
            stub.Search(search, timeout=30)
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), error.details()
        [response] = list(stub.UpsertPassages(iter([upsert]), timeout=30))
        assert response.error.code in ACCEPTABLE, response.error.message
