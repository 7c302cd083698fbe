"""Search modes end to end (issue 12): dense, lexical and hybrid through a real server and the client,
on the embedded store and on milvus-lite; validation of modes and filters; kill -9 durability.

Expected hybrid results are fused here, independently of the server, from its own dense and lexical
lists: sum of 1 / (k + rank) over the lists, ties to the smaller id.
"""

from __future__ import annotations

import signal

import grpc
import pytest
from conftest import TINY_MATRYOSHKA, ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_search import corpus

import scholarembed
from scholarembed import Client, Passage, filters
from scholarembed.v1 import search_pb2 as pb
from scholarembed.v1 import search_pb2_grpc as pb_grpc
from scholarembed_server.index.base import AnyOf, Equals, Range, matches

# Words a query parser (FTS5, tantivy, Milvus) could read as syntax, and text in other scripts.
SYNTAX = ['"', "'", "AND", "OR", "NOT", "NEAR", "NEAR(", "*", "-", ":", "(", ")", "^", "+", "{", "}", "title:",
          "text:", "col:x", '"unbalanced', "a*", "-x", "a:b", "\\", "%", "_", ";", "--", "/*", "ﬁ", "ß", "İ",
          "蛋白质", "белок", "البروتين", "🧬", "🙂👍🏽", "\u200b", "\x00", "the", "of", "and", "a"]  # fmt: skip


def fuse(lists: list[list[scholarembed.Hit]], k: int, top_k: int) -> list[tuple[str, float]]:
    scores: dict[str, float] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top_k]


def unique_term(number: int) -> str:
    return f"zqx{number:05d}"  # one token, untouched by English stemming, in no other passage


def tagged_corpus(count: int, prefix: str = "h") -> list[Passage]:
    """corpus() passages, each with a word of its own, and numeric metadata."""
    return [
        Passage(p.id, f"{p.text} {unique_term(i)}", p.title, {**p.metadata, "citations": str(i * 7 % 50)})
        for i, p in enumerate(corpus(count, prefix))
    ]


@pytest.fixture(scope="module", params=["embedded", "milvus"])
def server(request, tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp(f"hybrid-{request.param}")
    store = (
        ["--data-dir", str(folder / "data")] if request.param == "embedded" else ["--index-uri", str(folder / "m.db")]
    )
    server = ServerProcess(
        folder, "--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--max-top-k", "200", *store
    )
    with Client(server.address) as client:
        client.upsert_passages("papers", tagged_corpus(120), batch_size=40)
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with Client(server.address) as client:
        yield client


def test_an_old_client_gets_exactly_dense_search(server) -> None:
    """A request without the new fields is answered byte for byte as mode DENSE (and as before: no ranks)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        old = pb.SearchRequest(collection="papers", queries=["protein gene", "cell"], top_k=7, filter={"venue": "cell"})
        dense = pb.SearchRequest()
        dense.CopyFrom(old)
        dense.mode = pb.SEARCH_MODE_DENSE
        answer = stub.Search(old)
        assert answer.SerializeToString() == stub.Search(dense).SerializeToString()
        assert all(not hit.HasField("dense") and not hit.HasField("lexical") for r in answer.results for hit in r.hits)


def test_lexical_search_finds_a_passage_by_its_own_word(client) -> None:
    queries = [f"what about {unique_term(i)}?" for i in (0, 17, 119)]
    results = client.search_many(queries, collection="papers", top_k=3, mode="lexical", include_passages=True)
    assert [hits[0].id for hits in results] == ["h0", "h17", "h119"]
    assert all(hits[0].score > 0 for hits in results)
    assert unique_term(17) in results[1][0].text
    assert client.search("🧬 ** (", collection="papers", top_k=5, mode="lexical") == []  # no words, nothing found


@pytest.mark.parametrize(("rrf_k", "depth"), [(None, None), (1, 30)])
def test_hybrid_is_the_reciprocal_rank_fusion_of_the_two_lists(client, rrf_k, depth) -> None:
    k, candidates = rrf_k or 60, depth or 100
    for query in ["protein gene zqx00005", "tumor cell immune response", "drug dose survival"]:
        dense = client.search(query, collection="papers", top_k=candidates)
        lexical = client.search(query, collection="papers", top_k=candidates, mode="lexical")
        hits = client.search(query, collection="papers", top_k=10, mode="hybrid", rrf_k=rrf_k, depth=depth)
        expected = fuse([dense, lexical], k, 10)
        assert [h.id for h in hits] == [id_ for id_, _ in expected]
        assert [h.score for h in hits] == pytest.approx([score for _, score in expected], rel=1e-6)
        dense_places = {h.id: (rank, h.score) for rank, h in enumerate(dense, start=1)}
        lexical_places = {h.id: (rank, h.score) for rank, h in enumerate(lexical, start=1)}
        for hit in hits:
            for place, places in ((hit.dense, dense_places), (hit.lexical, lexical_places)):
                if hit.id in places:
                    assert place is not None
                    assert (place.rank, place.score) == pytest.approx(places[hit.id], rel=1e-6)
                else:
                    assert place is None


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_every_mode_applies_ranges_sets_and_exact_filters(client, mode) -> None:
    """Every passage has a word of its own and the query holds them all, so each mode's list is every
    passage the filter admits, by the brute-force oracle: `index.base.matches`, the filters' reference."""
    passages = {p.id: p for p in tagged_corpus(120)}
    conditions = [filters.at_least("citations", 20), filters.any_of("year", ["2001", "2003"])]
    reference = [Range("citations", gte=20), AnyOf("year", ("2001", "2003")), Equals("venue", "cell")]
    hits = client.search(
        " ".join(unique_term(i) for i in range(120)), collection="papers", top_k=120, mode=mode,
        conditions=conditions, metadata_filter={"venue": "cell"}, include_passages=True,
    )  # fmt: skip
    allowed = {id_ for id_, p in passages.items() if matches(p.metadata, reference)}
    assert len(allowed) == 19  # the oracle is not vacuous
    assert sorted(h.id for h in hits) == sorted(allowed)
    assert all(h.metadata == passages[h.id].metadata for h in hits)


def request_with(**fields) -> pb.SearchRequest:
    return pb.SearchRequest(collection="papers", queries=["protein"], top_k=5, **fields)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (request_with(mode=9), "mode"),
        (request_with(mode=pb.SEARCH_MODE_HYBRID, hybrid=pb.HybridOptions(rrf_k=10_001)), "hybrid.rrf_k"),
        (request_with(mode=pb.SEARCH_MODE_HYBRID, hybrid=pb.HybridOptions(depth=4)), "hybrid.depth"),
        (request_with(mode=pb.SEARCH_MODE_HYBRID, hybrid=pb.HybridOptions(depth=201)), "hybrid.depth"),
        (request_with(conditions=[pb.MetadataCondition(equals="x")]), "conditions[0].key"),
        (request_with(conditions=[filters.equals("a", "b"), pb.MetadataCondition(key="year")]), "conditions[1]"),
        (request_with(conditions=[filters.any_of("venue", [])]), "conditions[0].any_of.values"),
        (request_with(conditions=[filters.any_of("venue", ["v"] * 1025)]), "conditions[0].any_of.values"),
        (request_with(conditions=[pb.MetadataCondition(key="year", range=pb.NumericRange())]), "conditions[0].range"),
        (request_with(conditions=[filters.in_range("year", gte=float("nan"))]), "conditions[0].range.gte"),
        (request_with(conditions=[filters.in_range("year", lt=float("inf"))]), "conditions[0].range.lt"),
        (request_with(conditions=[filters.in_range("year", gt=1, gte=2)]), "conditions[0].range"),
        (request_with(conditions=[filters.in_range("year", lt=1, lte=2)]), "conditions[0].range"),
        (request_with(conditions=[filters.in_range("year", gte=2021, lte=2020)]), "conditions[0].range"),
        (request_with(conditions=[filters.equals("a", "b")] * 65), "conditions"),
    ],
)
def test_malformed_modes_and_filters_name_the_field(server, request_, field) -> None:
    modes = [request_.mode] if request_.mode else [pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_LEXICAL, pb.SEARCH_MODE_HYBRID]
    for mode in modes:  # a filter is checked the same in every mode
        request_.mode = mode
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.SearchServiceStub(channel).Search(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:"), caught.value.details()


def test_search_stream_carries_modes(client) -> None:
    queries = [unique_term(i) for i in range(40)]
    streamed = list(client.search_stream(queries, collection="papers", top_k=2, mode="lexical", batch_size=16))
    assert [hits[0].id for hits in streamed] == [f"h{i}" for i in range(40)]
    hybrid = list(client.search_stream(queries[:3], collection="papers", top_k=2, mode="hybrid"))
    assert [hits[0].id for hits in hybrid] == ["h0", "h1", "h2"]


texts = st.lists(st.sampled_from(SYNTAX) | st.text(max_size=8), min_size=1, max_size=12).map(" ".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=texts, passage=texts, mode=st.sampled_from([pb.SEARCH_MODE_LEXICAL, pb.SEARCH_MODE_HYBRID]))
def test_query_syntax_in_queries_and_passages_is_only_text(server, query, passage, mode) -> None:
    """Any text is answered; the one refusal is the documented one, an empty or whitespace-only text."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        upserts = [
            pb.UpsertPassagesRequest(collection="syntax", passages=[pb.Passage(id="base", text="a passage")]),
            pb.UpsertPassagesRequest(collection="syntax", passages=[pb.Passage(id="s", title=passage, text=passage)]),
        ]
        base, ack = list(stub.UpsertPassages(iter(upserts), timeout=30))
        assert base.upserted == 1, base.error.message
        if passage.strip():
            assert ack.upserted == 1, ack.error.message
        else:
            assert ack.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert ack.error.message.startswith("passages[0].text:"), ack.error.message
        request = pb.SearchRequest(collection="syntax", queries=[query], top_k=3, mode=mode)
        if query.strip():
            answer = stub.Search(request, timeout=30)
            assert len(answer.results) == 1
        else:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith("queries[0]:"), refused.value.details()


def test_kill_9_during_ingestion_every_acknowledged_passage_is_found_both_ways(tmp_path, tiny_model_dir) -> None:
    args = ("--model", str(tiny_model_dir), "--matryoshka-dims", TINY_MATRYOSHKA, "--data-dir", str(tmp_path / "data"))
    server = ServerProcess(tmp_path, *args)
    passages = tagged_corpus(2000, prefix="k")
    acked: list[str] = []
    with Client(server.address) as client, pytest.raises(scholarembed.ScholarEmbedError):
        for ack in client.upsert_stream("crash", passages, batch_size=25, max_in_flight=8):
            acked += ack.ids
            if len(acked) >= 400:
                server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    server.stop()

    server = ServerProcess(tmp_path, *args)
    try:
        with Client(server.address) as client:
            count = client.get_collection("crash").passage_count
            assert count >= len(acked)
            found = client.search_stream(
                (unique_term(i) for i in range(len(passages))), collection="crash", top_k=1, mode="lexical"
            )
            lexically = {hits[0].id for hits in found if hits}
            assert set(acked) <= lexically  # every acknowledged passage, by its own word
            assert len(lexically) == count  # and nothing the vectors do not have
            dense = client.search(passages[0].text, collection="crash", top_k=count)
            assert {h.id for h in dense} == lexically
            client.delete_passages("crash", acked[:10])  # a delete removes from both
            for id_ in acked[:10]:
                number = int(id_.removeprefix("k"))
                assert client.search(unique_term(number), collection="crash", top_k=1, mode="lexical") == []
    finally:
        server.stop()
