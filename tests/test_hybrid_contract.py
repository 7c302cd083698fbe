"""The lexical half of the VectorIndex contract and the filters, on the embedded store and milvus-lite.

Filters are checked against a brute-force oracle written here from the proto's words (not the
server's `matches`): a value is a number when, stripped of ASCII whitespace, it is made of ASCII
digits, signs, ".", "e" and Python's float() reads it as a finite number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymilvus import DataType, MilvusClient
from test_hybrid import SYNTAX

from scholarembed_server.errors import FailedPreconditionError
from scholarembed_server.index.base import (
    AnyOf,
    Equals,
    IndexKind,
    LexicalUnavailableError,
    Range,
    StoredPassage,
    VectorIndex,
    VectorStorage,
)
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.index.milvus import MilvusIndex

FULL = 16
MODEL = "test/synthetic-16"
BACKENDS = ["embedded", "milvus"]


def open_store(kind: str, folder: Path) -> VectorIndex:
    if kind == "embedded":
        return EmbeddedIndex(folder)
    return MilvusIndex(str(folder / "milvus.db"), matryoshka_dims=(8,))


def create(store: VectorIndex, name: str) -> None:
    store.create_collection(
        name, dimensions=FULL, model=MODEL, index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT32
    )


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, FULL)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def oracle_number(value: str) -> float | None:
    text = value.strip(" \t\n\r")
    if not text or any(c not in "0123456789+-.eE" for c in text):
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def oracle(metadata: dict[str, str], conditions: list) -> bool:
    for condition in conditions:
        if condition.key not in metadata:
            return False
        value = metadata[condition.key]
        if isinstance(condition, Equals) and value != condition.value:
            return False
        if isinstance(condition, AnyOf) and value not in condition.values:
            return False
        if isinstance(condition, Range):
            number = oracle_number(value)
            if number is None:
                return False
            if condition.gt is not None and not number > condition.gt:
                return False
            if condition.gte is not None and not number >= condition.gte:
                return False
            if condition.lt is not None and not number < condition.lt:
                return False
            if condition.lte is not None and not number <= condition.lte:
                return False
    return True


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    opened = open_store(request.param, tmp_path)
    yield opened
    opened.close()


def test_lexical_search_follows_upserts_replacements_deletes_and_reopens(store: VectorIndex, tmp_path: Path) -> None:
    create(store, "lex")
    texts = ["membrane protein folding", "ribosome assembly kinetics", "protein kinase inhibitor", "unrelated words"]
    store.upsert("lex", [StoredPassage(f"p{i}", f"title {i}", t) for i, t in enumerate(texts)], unit_vectors(4, 1))
    [hits] = store.lexical_search("lex", ["protein"], 10)
    assert {h.id for h in hits} == {"p0", "p2"} and all(h.score > 0 for h in hits)
    [titled] = store.lexical_search("lex", ["title 3"], 1, include_passages=True)  # the title is indexed too
    assert titled[0].passage == StoredPassage("p3", "title 3", "unrelated words")
    store.upsert("lex", [StoredPassage("p0", "", "lipid bilayer")], unit_vectors(1, 2))  # replaces p0
    assert [[h.id for h in hits] for hits in store.lexical_search("lex", ["protein", "bilayer"], 10)] == [
        ["p2"],
        ["p0"],
    ]
    assert store.delete("lex", ["p2"]) == 1
    assert store.lexical_search("lex", ["protein", "kinase"], 10) == [[], []]
    assert store.lexical_search("lex", ["", "🙂 ** ()", "ribosome"], 10)[:2] == [[], []]


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_lexical_index_survives_a_reopen(kind: str, tmp_path: Path) -> None:
    store = open_store(kind, tmp_path)
    create(store, "kept")
    store.upsert("kept", [StoredPassage("a", "", "telomerase activity")], unit_vectors(1, 3))
    store.close()
    store = open_store(kind, tmp_path)
    try:
        assert [[h.id for h in hits] for hits in store.lexical_search("kept", ["telomerase"], 5)] == [["a"]]
    finally:
        store.close()


def test_a_milvus_collection_from_before_lexical_search_refuses_lexical_modes_clearly(tmp_path: Path) -> None:
    """Made as the store made collections before this change; Milvus cannot add the BM25 function later."""
    path = str(tmp_path / "milvus.db")
    client = MilvusClient(path)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    for name in ("title", "text"):
        schema.add_field(name, DataType.VARCHAR, max_length=65535)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=FULL)
    properties = {"scholarembed.model": MODEL, "scholarembed.index_kind": "flat", "scholarembed.prefix_dimensions": ""}
    client.create_collection("scholarembed_old", schema=schema, num_shards=1, properties=properties)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="COSINE")
    client.create_index("scholarembed_old", params)
    client.close()
    store = MilvusIndex(path)
    try:
        store.upsert("old", [StoredPassage("a", "", "text", {"year": "2020"})], unit_vectors(1, 6))
        assert [h.id for h in store.search("old", unit_vectors(1, 6), 1, metadata_filter={"year": "2020"})[0]] == ["a"]
        with pytest.raises(LexicalUnavailableError, match="created before lexical search") as caught:
            store.lexical_search("old", ["text"], 1)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(FailedPreconditionError, match="numeric ranges"):
            store.search("old", unit_vectors(1, 6), 1, metadata_filter=[Range("year", gte=2000)])
    finally:
        store.close()


# -- filters against the oracle, property-tested on both stores -----------------------------------------

KEYS = ["year", "venue", "n"]
VALUES = ["2019", "2020", " 2021 ", "2020.5", "-3", "+.5", "1e3", "5.", "nature", "cell", "", "NaN", "inf", "1e999",
          "0x10", "1,000", "١٢", "2020a", "1_000", ".", "-"]  # fmt: skip
COUNT = 120


def random_metadata(seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{key: str(rng.choice(VALUES)) for key in KEYS if rng.random() < 0.8} for _ in range(COUNT)]


@pytest.fixture(scope="module", params=BACKENDS)
def filtered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    store = open_store(request.param, tmp_path_factory.mktemp(f"filters-{request.param}"))
    create(store, "meta")
    metadata = random_metadata(7)
    store.upsert(
        "meta",
        [StoredPassage(f"m{i}", "", f"shared word{i}", m) for i, m in enumerate(metadata)],
        unit_vectors(COUNT, 8),
    )
    yield store, metadata
    store.close()


bounds = st.one_of(st.none(), st.sampled_from([-3.0, 0.0, 0.5, 1000.0, 2019.0, 2020.0, 2020.5, 2021.0, 1e300]))
conditions = st.lists(
    st.one_of(
        st.builds(Equals, st.sampled_from([*KEYS, "absent"]), st.sampled_from(VALUES)),
        st.builds(AnyOf, st.sampled_from(KEYS), st.lists(st.sampled_from(VALUES), min_size=1, max_size=4).map(tuple)),
        st.builds(Range, st.sampled_from([*KEYS, "absent"]), gt=bounds, gte=bounds, lt=bounds, lte=bounds).filter(
            lambda r: any(b is not None for b in (r.gt, r.gte, r.lt, r.lte))
        ),
    ),
    max_size=3,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conditions=conditions)
def test_filters_match_the_brute_force_oracle_in_every_mode(filtered, conditions) -> None:
    store, metadata = filtered
    expected = {f"m{i}" for i, m in enumerate(metadata) if oracle(m, conditions)}
    [dense] = store.search("meta", unit_vectors(1, 9), COUNT, metadata_filter=conditions)
    [lexical] = store.lexical_search("meta", ["shared"], COUNT, metadata_filter=conditions)
    assert {h.id for h in dense} == expected
    assert {h.id for h in lexical} == expected


# -- text that a query parser (FTS5, tantivy, Milvus) reads as syntax ----------------------------------

syntax_text = st.lists(st.sampled_from(SYNTAX) | st.text(max_size=6), min_size=1, max_size=10).map(" ".join)


@pytest.fixture(scope="module", params=BACKENDS)
def syntax_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    store = open_store(request.param, tmp_path_factory.mktemp(f"syntax-{request.param}"))
    create(store, "syntax")
    yield store
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(passage=syntax_text, queries=st.lists(syntax_text, min_size=1, max_size=3))
def test_fts_syntax_in_passages_and_queries_is_only_text(syntax_store, passage, queries) -> None:
    """Never an error; a passage is found by a query that repeats one of its words."""
    syntax_store.upsert("syntax", [StoredPassage("s", passage, passage)], unit_vectors(1, 10))
    results = syntax_store.lexical_search("syntax", [*queries, passage], 5)
    assert len(results) == len(queries) + 1
    if any(c.isascii() and c.isalnum() for c in passage):  # an ASCII word: tokenised alike everywhere
        assert [h.id for h in results[-1]] == ["s"]
