"""The VectorIndex contract, run against every store; then what each store promises on its own.

The contract suite runs on the embedded FAISS + SQLite store and on Milvus (milvus-lite, in this
process). Vectors are synthetic unit vectors: 64 dimensions with Matryoshka prefixes 32 and 16, and
every search is checked against numpy brute force on the re-normalised prefix.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from scholarembed_server.errors import InvalidArgumentError
from scholarembed_server.index.base import (
    CollectionNotFoundError,
    CorruptCollectionError,
    IndexKind,
    StorageError,
    StoredPassage,
    VectorIndex,
    VectorStorage,
)
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.index.embedded import collection as embedded_collection
from scholarembed_server.index.embedded import vectors as embedded_vectors
from scholarembed_server.index.milvus import MilvusIndex, MilvusUnavailableError

FULL = 64
PREFIXES = (32, 16)
MODEL = "test/synthetic-64"

Opener = Callable[[], VectorIndex]


def unit_vectors(count: int, seed: int, dimensions: int = FULL) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_unit_vectors(count: int, seed: int, clusters: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, FULL))
    vectors = centres[rng.integers(clusters, size=count)] + 0.35 * rng.normal(size=(count, FULL))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def passages(count: int, start: int = 0, text: str = "text") -> list[StoredPassage]:
    return [
        StoredPassage(
            f"p{i}", f"title {i}", f"{text} {i}", {"parity": "even" if i % 2 == 0 else "odd", "tens": str(i // 10)}
        )
        for i in range(start, start + count)
    ]


def create(index: VectorIndex, name: str = "papers", kind: IndexKind = IndexKind.FLAT) -> None:
    index.create_collection(name, dimensions=FULL, model=MODEL, index_kind=kind, vector_storage=VectorStorage.FLOAT32)


def prefix_normalised(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The test's own Matryoshka prefix, written apart from the store's: the first `dimensions` components
    of each row, divided by their norm (computed in float64), returned as float32 as a server sends them."""
    head = np.asarray(vectors, dtype=np.float64)[:, :dimensions]
    return (head / np.sqrt(np.einsum("ij,ij->i", head, head))[:, None]).astype(np.float32)


def exact_top(vectors: np.ndarray, ids: list[str], queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """numpy brute force: cosine on the re-normalised prefix of the queries' width."""
    dimensions = queries.shape[1]
    scores = prefix_normalised(queries, dimensions).astype(np.float64) @ prefix_normalised(vectors, dimensions).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(ids[j], float(row[j])) for j in top] for row, top in zip(scores, order, strict=True)]


def assert_hits_equal(hits: list, expected: list[tuple[str, float]]) -> None:
    assert [hit.id for hit in hits] == [id_ for id_, _ in expected]
    np.testing.assert_allclose([hit.score for hit in hits], [score for _, score in expected], atol=2e-5)


def open_milvus(path: str, matryoshka_dims: tuple[int, ...] = PREFIXES) -> MilvusIndex:
    return MilvusIndex(path, matryoshka_dims=matryoshka_dims)


@pytest.fixture(params=["embedded", "milvus"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the store on the same path each time it is called (a reopen); all are closed at the end."""
    opened: list[VectorIndex] = []

    def open_store() -> VectorIndex:
        if request.param == "embedded":
            store: VectorIndex = EmbeddedIndex(tmp_path)
        else:
            store = open_milvus(str(tmp_path / "milvus.db"))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> VectorIndex:
    return opener()


@pytest.fixture
def filled(store: VectorIndex) -> tuple[VectorIndex, np.ndarray, list[str]]:
    """A flat collection of 300 passages p0..p299."""
    create(store)
    vectors = unit_vectors(300, seed=1)
    store.upsert("papers", passages(300), vectors)
    return store, vectors, [f"p{i}" for i in range(300)]


# -- the contract, on every store --------------------------------------------------------------------


def test_collections_are_created_once_listed_sorted_and_deleted(store: VectorIndex) -> None:
    first = store.create_collection(
        "zeta", dimensions=FULL, model=MODEL, index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT32
    )
    assert (first.name, first.passage_count, first.dimensions, first.model) == ("zeta", 0, FULL, MODEL)
    assert first.index_kind is IndexKind.FLAT and first.vector_storage is VectorStorage.FLOAT32
    store.upsert("zeta", passages(3), unit_vectors(3, seed=2))
    again = store.create_collection(
        "zeta", dimensions=32, model="other", index_kind=IndexKind.HNSW, vector_storage=VectorStorage.FLOAT16
    )
    assert again == store.get_collection("zeta")
    assert (again.passage_count, again.dimensions, again.model, again.index_kind) == (3, FULL, MODEL, IndexKind.FLAT)

    for name in ("alpha", "Beta-2", "b_1", "a-b", "a_b"):
        create(store, name)
    assert [info.name for info in store.list_collections()] == ["Beta-2", "a-b", "a_b", "alpha", "b_1", "zeta"]

    assert store.delete_collection("zeta") == 3
    with pytest.raises(CollectionNotFoundError):
        store.get_collection("zeta")
    assert "zeta" not in [info.name for info in store.list_collections()]
    create(store, "zeta")
    assert store.get_collection("zeta").passage_count == 0


@pytest.mark.parametrize("name", ["", "has space", "dot.ted", "slash/ed", "x" * 65, "ünï"])
def test_invalid_collection_names_are_refused(store: VectorIndex, name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        create(store, name)
    with pytest.raises(InvalidArgumentError):
        store.get_collection(name)
    with pytest.raises(InvalidArgumentError):
        store.search(name, unit_vectors(1, seed=3), 5)


def test_unknown_collections_are_not_found(store: VectorIndex) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.get_collection("missing"),
        lambda: store.delete_collection("missing"),
        lambda: store.upsert("missing", passages(1), unit_vectors(1, seed=4)),
        lambda: store.delete("missing", ["p0"]),
        lambda: store.get("missing", ["p0"]),
        lambda: store.search("missing", unit_vectors(1, seed=4), 5),
    ]
    for call in calls:
        with pytest.raises(CollectionNotFoundError) as raised:
            call()
        assert raised.value.code.name == "NOT_FOUND"


def test_upsert_replaces_existing_ids(filled: tuple[VectorIndex, np.ndarray, list[str]]) -> None:
    store, vectors, _ = filled
    new_vectors = unit_vectors(10, seed=5)
    assert store.upsert("papers", passages(10, start=0, text="revised"), new_vectors) == 10
    assert store.get_collection("papers").passage_count == 300
    assert [p.text for p in store.get("papers", ["p0", "p9", "p10"])] == ["revised 0", "revised 9", "text 10"]

    (by_new,) = store.search("papers", new_vectors[3:4], 1)
    assert by_new[0].id == "p3" and by_new[0].score == pytest.approx(1.0, abs=1e-5)
    (by_old,) = store.search("papers", vectors[3:4], 300)
    assert [hit.id for hit in by_old].count("p3") == 1
    assert next(hit.score for hit in by_old if hit.id == "p3") == pytest.approx(
        float(vectors[3] @ new_vectors[3]), abs=1e-5
    )


def test_delete_counts_what_existed(filled: tuple[VectorIndex, np.ndarray, list[str]]) -> None:
    store, vectors, _ = filled
    assert store.delete("papers", ["p1", "p2", "p2", "nope", "p250"]) == 3
    assert store.delete("papers", ["p1", "nope"]) == 0
    assert store.get_collection("papers").passage_count == 297
    assert store.get("papers", ["p1", "p2", "p250", "p3"]) == [passages(1, start=3)[0]]
    (hits,) = store.search("papers", vectors[1:2], 300)
    assert {"p1", "p2", "p250"}.isdisjoint(hit.id for hit in hits) and len(hits) == 297


def test_get_keeps_the_order_of_ids_and_leaves_out_missing(filled: tuple[VectorIndex, np.ndarray, list[str]]) -> None:
    store, _, _ = filled
    got = store.get("papers", ["p42", "missing", "p7", "p42", "p299"])
    assert [p.id for p in got] == ["p42", "p7", "p299"]
    assert got[0] == StoredPassage("p42", "title 42", "text 42", {"parity": "even", "tens": "4"})
    assert store.get("papers", []) == []


@pytest.mark.parametrize("dimensions", [FULL, *PREFIXES])
def test_exact_search_equals_brute_force(filled: tuple[VectorIndex, np.ndarray, list[str]], dimensions: int) -> None:
    store, vectors, ids = filled
    queries = prefix_normalised(unit_vectors(5, seed=6), dimensions)
    results = store.search("papers", queries, 10)
    for hits, expected in zip(results, exact_top(vectors, ids, queries, 10), strict=True):
        assert_hits_equal(hits, expected)
        assert all(-1.0 - 1e-5 <= hit.score <= 1.0 + 1e-5 for hit in hits)


def test_top_k_larger_than_the_collection_returns_everything(store: VectorIndex) -> None:
    create(store)
    vectors = unit_vectors(7, seed=7)
    store.upsert("papers", passages(7), vectors)
    queries = unit_vectors(2, seed=8)
    results = store.search("papers", queries, 50)
    for hits, expected in zip(results, exact_top(vectors, [f"p{i}" for i in range(7)], queries, 50), strict=True):
        assert len(hits) == 7
        assert_hits_equal(hits, expected)


def test_empty_collection_finds_nothing(store: VectorIndex) -> None:
    create(store)
    assert store.search("papers", unit_vectors(3, seed=9), 5) == [[], [], []]


def test_metadata_filter_matches_exactly(filled: tuple[VectorIndex, np.ndarray, list[str]]) -> None:
    store, vectors, ids = filled
    queries = unit_vectors(3, seed=10)

    def expected(keep: Callable[[int], bool], query_rows: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        rows = [i for i in range(300) if keep(i)]
        return exact_top(vectors[rows], [ids[i] for i in rows], query_rows, k)

    for hits, want in zip(
        store.search("papers", queries, 10, metadata_filter={"parity": "odd"}),
        expected(lambda i: i % 2 == 1, queries, 10),
        strict=True,
    ):
        assert_hits_equal(hits, want)
    both = store.search("papers", queries, 10, metadata_filter={"parity": "even", "tens": "1"})
    for hits, want in zip(both, expected(lambda i: 10 <= i < 20 and i % 2 == 0, queries, 10), strict=True):
        assert len(hits) == 5
        assert_hits_equal(hits, want)
    prefix = prefix_normalised(queries, 16)
    for hits, want in zip(
        store.search("papers", prefix, 4, metadata_filter={"tens": "2"}),
        expected(lambda i: 20 <= i < 30, prefix, 4),
        strict=True,
    ):
        assert_hits_equal(hits, want)
    assert store.search("papers", queries, 10, metadata_filter={"tens": "1", "parity": "none"}) == [[], [], []]
    assert store.search("papers", queries, 10, metadata_filter={"absent": "even"}) == [[], [], []]
    assert store.search("papers", queries, 10, metadata_filter={"tens": "1 "}) == [[], [], []]


def test_metadata_filter_values_are_escaped(store: VectorIndex) -> None:
    create(store)
    awkward = {'say "hi"': "back\\slash", "quote's": 'x" or metadata["a"] != "', "line": "one\ntwo\tü"}
    store.upsert(
        "papers",
        [StoredPassage("odd", "", "t", awkward), StoredPassage("plain", "", "t", {"line": "one"})],
        unit_vectors(2, seed=11),
    )
    for key, value in awkward.items():
        (hits,) = store.search("papers", unit_vectors(1, seed=12), 5, metadata_filter={key: value})
        assert [hit.id for hit in hits] == ["odd"]
    (hits,) = store.search("papers", unit_vectors(1, seed=12), 5, metadata_filter={"quote's": 'x" or "1" == "1'})
    assert hits == []


def test_include_passages_returns_title_text_and_metadata(filled: tuple[VectorIndex, np.ndarray, list[str]]) -> None:
    store, vectors, _ = filled
    (with_passages,) = store.search("papers", vectors[11:12], 3, include_passages=True)
    assert with_passages[0].id == "p11"
    assert with_passages[0].passage == StoredPassage("p11", "title 11", "text 11", {"parity": "odd", "tens": "1"})
    assert all(hit.passage is not None and hit.passage.id == hit.id for hit in with_passages)
    (without,) = store.search("papers", vectors[11:12], 3)
    assert [hit.id for hit in without] == [hit.id for hit in with_passages]
    assert all(hit.passage is None for hit in without)


def test_reopening_keeps_everything(opener: Opener) -> None:
    store = opener()
    create(store)
    create(store, "other-one")
    vectors = unit_vectors(120, seed=13)
    store.upsert("papers", passages(120), vectors)
    store.upsert("papers", passages(5, text="new"), vectors[:5][::-1].copy())
    store.delete("papers", ["p100", "p101"])
    store.upsert("other-one", passages(2), unit_vectors(2, seed=14))
    queries = unit_vectors(3, seed=15)
    before = [store.search("papers", prefix_normalised(queries, d), 10, include_passages=True) for d in (FULL, 16)]
    infos = store.list_collections()
    store.close()

    reopened = opener()
    assert reopened.list_collections() == infos
    assert [info.passage_count for info in infos] == [2, 118]
    assert reopened.get("papers", ["p0", "p100", "p119"]) == [
        StoredPassage("p0", "title 0", "new 0", {"parity": "even", "tens": "0"}),
        StoredPassage("p119", "title 119", "text 119", {"parity": "odd", "tens": "11"}),
    ]
    after = [reopened.search("papers", prefix_normalised(queries, d), 10, include_passages=True) for d in (FULL, 16)]
    for old, new in zip(before, after, strict=True):
        for old_hits, new_hits in zip(old, new, strict=True):
            assert [(h.id, h.passage) for h in new_hits] == [(h.id, h.passage) for h in old_hits]
            np.testing.assert_allclose([h.score for h in new_hits], [h.score for h in old_hits], atol=1e-6)
    assert reopened.upsert("papers", passages(1, start=500), unit_vectors(1, seed=16)) == 1
    assert reopened.get_collection("papers").passage_count == 119


# -- the embedded store ------------------------------------------------------------------------------


def embedded_with_rows(path: Path, count: int = 20) -> tuple[EmbeddedIndex, np.ndarray]:
    store = EmbeddedIndex(path)
    create(store)
    vectors = unit_vectors(count, seed=20)
    store.upsert("papers", passages(count), vectors)
    return store, vectors


def test_uncommitted_vector_bytes_are_cut_off_on_reopen(tmp_path: Path) -> None:
    store, vectors = embedded_with_rows(tmp_path)
    store.close()
    vectors_bin = tmp_path / "papers" / "vectors.bin"
    committed = vectors_bin.stat().st_size
    with open(vectors_bin, "ab") as file:  # a crash after step 1, before the commit
        file.write(unit_vectors(3, seed=21).tobytes() + b"\x01\x02")

    store = EmbeddedIndex(tmp_path)
    assert vectors_bin.stat().st_size == committed
    assert store.get_collection("papers").passage_count == 20
    (hits,) = store.search("papers", vectors[4:5], 1)
    assert hits[0].id == "p4"
    store.upsert("papers", passages(1, start=20), unit_vectors(1, seed=22))
    assert vectors_bin.stat().st_size == committed + FULL * 4
    store.close()


def test_vectors_shorter_than_committed_rows_are_refused(tmp_path: Path) -> None:
    store, _ = embedded_with_rows(tmp_path)
    create(store, "healthy")
    store.close()
    vectors_bin = tmp_path / "papers" / "vectors.bin"
    with open(vectors_bin, "r+b") as file:
        file.truncate(vectors_bin.stat().st_size - FULL * 4)

    store = EmbeddedIndex(tmp_path)  # the other collections are still served
    assert [info.name for info in store.list_collections()] == ["healthy"]
    for call in (
        lambda: store.get_collection("papers"),
        lambda: store.search("papers", unit_vectors(1, seed=23), 5),
        lambda: store.upsert("papers", passages(1), unit_vectors(1, seed=23)),
        lambda: create(store),
    ):
        with pytest.raises(CorruptCollectionError) as raised:
            call()
        assert raised.value.code.name == "DATA_LOSS"
    assert store.delete_collection("papers") == 20  # the way out the error message names
    create(store)
    assert store.get_collection("papers").passage_count == 0
    store.close()


def failing_fsync(descriptor: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def failing_commit(self: object, start: int, batch: list[StoredPassage]) -> tuple[list[int], int]:
    raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("failure", ["vectors-file", "database"])
def test_a_failed_write_changes_nothing_and_the_collection_stays_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    store, vectors = embedded_with_rows(tmp_path)
    vectors_bin = tmp_path / "papers" / "vectors.bin"
    size = vectors_bin.stat().st_size
    with monkeypatch.context() as patch:
        if failure == "vectors-file":
            patch.setattr(embedded_collection.os, "fsync", failing_fsync)
        else:
            patch.setattr(embedded_collection.Collection, "_commit_rows", failing_commit)
        with pytest.raises(StorageError):
            store.upsert("papers", passages(5, start=18, text="lost"), unit_vectors(5, seed=24))

    assert vectors_bin.stat().st_size == size
    assert store.get_collection("papers").passage_count == 20
    assert [p.text for p in store.get("papers", ["p18", "p19", "p20"])] == ["text 18", "text 19"]
    (hits,) = store.search("papers", vectors[18:19], 25)
    assert len(hits) == 20 and hits[0].id == "p18"

    assert store.upsert("papers", passages(2, start=20), unit_vectors(2, seed=25)) == 2
    store.close()
    store = EmbeddedIndex(tmp_path)
    assert store.get_collection("papers").passage_count == 22
    assert vectors_bin.stat().st_size == size + 2 * FULL * 4
    store.close()


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """5000 passages (IVF trains from 4096 rows) and 40 queries from the same 64 clusters."""
    vectors = clustered_unit_vectors(5040, seed=30)
    return vectors[:5000], vectors[5000:]


@pytest.mark.parametrize("kind", [IndexKind.HNSW, IndexKind.IVF])
def test_approximate_indexes_recall_at_least_0_9(
    tmp_path: Path, clustered: tuple[np.ndarray, np.ndarray], kind: IndexKind
) -> None:
    vectors, queries = clustered
    ids = [f"p{i}" for i in range(len(vectors))]
    store = EmbeddedIndex(tmp_path)
    create(store, kind=kind)
    store.upsert("papers", passages(len(vectors)), vectors)
    store.wait_until_indexed("papers", [FULL, 16])  # searches are exact until then
    for dimensions in (FULL, 16):
        query_prefixes = prefix_normalised(queries, dimensions)
        results = store.search("papers", query_prefixes, 10)
        expected = exact_top(vectors, ids, query_prefixes, 10)
        found = sum(
            len({h.id for h in hits} & {i for i, _ in want}) for hits, want in zip(results, expected, strict=True)
        )
        assert found / (10 * len(queries)) >= 0.9, (kind, dimensions)
    if kind is IndexKind.IVF:
        assert isinstance(store._collections["papers"].vectors._ready[FULL].index, embedded_vectors.faiss.IndexIVFFlat)
    store.close()


@pytest.mark.parametrize(
    ("kind", "rows", "search_device"),
    [
        (IndexKind.HNSW, 300, "cpu"),
        (IndexKind.HNSW, 300, "cuda:0"),  # HNSW and IVF run on the CPU even on a GPU server
        (IndexKind.IVF, embedded_vectors.IVF_MIN_TRAINING_ROWS + 100, "cpu"),  # enough rows to train real IVF lists
    ],
)
def test_a_saved_approximate_index_is_reused_on_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: IndexKind, rows: int, search_device: str
) -> None:
    store = EmbeddedIndex(tmp_path, search_device=search_device)
    create(store, kind=kind)
    vectors = clustered_unit_vectors(rows, seed=20)
    store.upsert("papers", passages(rows), vectors)
    store.wait_until_indexed("papers", [FULL])
    before = store.search("papers", vectors[:3], 5)
    store.close()
    saved = tmp_path / "papers" / f"{kind.value}-{FULL}.faiss"
    assert saved.exists()
    faiss = embedded_vectors.faiss
    assert isinstance(faiss.read_index(str(saved)), faiss.IndexHNSW if kind is IndexKind.HNSW else faiss.IndexIVFFlat)

    store = EmbeddedIndex(tmp_path, search_device=search_device)

    def no_new_index(self: object, dimensions: int, stored: np.ndarray) -> None:
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(embedded_vectors.VectorIndexes, "_new_approximate", no_new_index)
    store.upsert("papers", passages(1, start=rows), unit_vectors(1, seed=31))
    store.wait_until_indexed("papers", [FULL])  # raises if the builder tried to build a new one
    after = store.search("papers", vectors[:3], 5)
    assert [[h.id for h in hits] for hits in after] == [[h.id for h in hits] for hits in before]
    assert store.search("papers", unit_vectors(1, seed=31), 1)[0][0].id == f"p{rows}"
    store.close()


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW, IndexKind.IVF])
def test_dead_rows_never_show_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clustered: tuple[np.ndarray, np.ndarray], kind: IndexKind
) -> None:
    """Searched by the index, by an index extended since (a copy, for HNSW and IVF), by the index and an
    exact scan of the rows it lacks, and exactly after a reopen, until the index is loaded again."""
    monkeypatch.setattr(embedded_vectors, "ANN_TAIL_ROWS", 30)
    vectors, _ = clustered
    count = 4200 if kind is IndexKind.IVF else 600
    store = EmbeddedIndex(tmp_path)
    create(store, kind=kind)
    store.upsert("papers", passages(count), vectors[:count])
    store.wait_until_indexed("papers", [FULL])
    current = {f"p{i}": vectors[i] for i in range(count)}
    store.upsert("papers", passages(40, text="new"), vectors[count : count + 40])
    current.update((f"p{i}", vectors[count + i]) for i in range(40))
    deleted = [f"p{i}" for i in range(40, 80)]
    assert store.delete("papers", deleted) == 40
    for id_ in deleted:
        del current[id_]
    store.wait_until_indexed("papers", [FULL])
    assert store._collections["papers"].vectors._ready[FULL].rows == count + 40
    store.upsert("papers", passages(10, start=count), vectors[count + 40 : count + 50])  # below ANN_TAIL_ROWS
    current.update((f"p{count + i}", vectors[count + 40 + i]) for i in range(10))
    queries = vectors[:80]  # the dead rows' own vectors: they would be the best hits
    for state in ("in memory", "reopened", "index loaded again"):
        if state == "reopened":
            store.close()
            store = EmbeddedIndex(tmp_path)
        elif state == "index loaded again":
            store.wait_until_indexed("papers", [FULL])
        for filter_ in (None, {"parity": "even"}):
            for query, hits in zip(queries, store.search("papers", queries, 20, metadata_filter=filter_), strict=True):
                assert len(hits) == 20 and len({hit.id for hit in hits}) == 20
                for hit in hits:  # scored against the live vector of its id, never a dead one
                    assert hit.score == pytest.approx(float(current[hit.id] @ query), abs=1e-5)
    store.close()


def test_float16_results_do_not_change_on_reopen(tmp_path: Path) -> None:
    store = EmbeddedIndex(tmp_path)
    store.create_collection(
        "papers", dimensions=FULL, model=MODEL, index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT16
    )
    store.upsert("papers", passages(200), unit_vectors(200, seed=40))
    queries = unit_vectors(4, seed=41)
    store.search("papers", queries, 1)  # the in-memory index exists before the next write
    store.upsert("papers", passages(50, start=200), unit_vectors(50, seed=42))
    before = store.search("papers", queries, 20)
    store.close()
    store = EmbeddedIndex(tmp_path)
    after = store.search("papers", queries, 20)
    for old, new in zip(before, after, strict=True):
        assert [(h.id, h.score) for h in new] == [(h.id, h.score) for h in old]
    store.close()


def test_leftovers_of_interrupted_creates_and_deletes_are_removed(tmp_path: Path) -> None:
    store, _ = embedded_with_rows(tmp_path)
    store.close()
    for leftover in (".creating-papers", ".deleting-gone"):
        (tmp_path / leftover).mkdir()
        sqlite3.connect(tmp_path / leftover / "collection.sqlite").close()
    store = EmbeddedIndex(tmp_path)
    assert [info.name for info in store.list_collections()] == ["papers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "papers"]  # .lock: the data dir's owner
    store.close()


def test_calls_on_a_deleted_collection_are_not_found(tmp_path: Path) -> None:
    store, _ = embedded_with_rows(tmp_path)
    collection = store._collections["papers"]  # as held by a call that was waiting for its lock
    store.delete_collection("papers")
    with pytest.raises(CollectionNotFoundError):
        collection.upsert(passages(1), unit_vectors(1, seed=43))
    with pytest.raises(CollectionNotFoundError):
        collection.search(unit_vectors(1, seed=43), 5, None, False)
    store.close()


# -- the Milvus store --------------------------------------------------------------------------------


def test_milvus_searches_an_unstored_prefix_by_reranking_exactly(tmp_path: Path) -> None:
    store = open_milvus(str(tmp_path / "milvus.db"), matryoshka_dims=(16,))
    create(store)
    vectors = clustered_unit_vectors(1000, seed=50)
    ids = [f"p{i}" for i in range(1000)]
    store.upsert("papers", passages(1000), vectors)
    queries = prefix_normalised(clustered_unit_vectors(20, seed=51), 32)
    results = store.search("papers", queries, 10, include_passages=True)
    expected = exact_top(vectors, ids, queries, 10)
    exact_scores = queries @ prefix_normalised(vectors, 32).T
    found = 0
    for query_scores, hits, want in zip(exact_scores, results, expected, strict=True):
        assert len(hits) == 10 and all(hit.passage is not None and hit.passage.id == hit.id for hit in hits)
        for hit in hits:  # every score is the exact cosine on the re-normalised prefix
            assert hit.score == pytest.approx(float(query_scores[ids.index(hit.id)]), abs=1e-5)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        found += len({hit.id for hit in hits} & {id_ for id_, _ in want})
    assert found / 200 >= 0.9
    store.close()


def test_milvus_stores_float32_and_refuses_oversized_fields(tmp_path: Path) -> None:
    store = open_milvus(str(tmp_path / "milvus.db"))
    info = store.create_collection(
        "papers", dimensions=FULL, model=MODEL, index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT16
    )
    assert info.vector_storage is VectorStorage.FLOAT32
    batch = [*passages(2), StoredPassage("big", "", "é" * 40000)]
    with pytest.raises(InvalidArgumentError) as raised:
        store.upsert("papers", batch, unit_vectors(3, seed=52))
    assert raised.value.field == "passages[2].text"
    assert store.get_collection("papers").passage_count == 0
    store.close()


@pytest.mark.parametrize("kind", [IndexKind.HNSW, IndexKind.IVF])
def test_milvus_approximate_indexes_find_the_exact_neighbours(
    tmp_path: Path, clustered: tuple[np.ndarray, np.ndarray], kind: IndexKind
) -> None:
    vectors, queries = clustered[0][:2000], clustered[1]
    ids = [f"p{i}" for i in range(len(vectors))]
    store = open_milvus(str(tmp_path / "milvus.db"))
    create(store, kind=kind)
    store.upsert("papers", passages(len(vectors)), vectors)
    store.delete("papers", ["p0", "p1"])
    store.close()  # milvus-lite indexes a segment once it is flushed
    store = open_milvus(str(tmp_path / "milvus.db"))
    assert store.get_collection("papers").index_kind is kind
    for dimensions in (FULL, 16):
        query_prefixes = prefix_normalised(queries, dimensions)
        results = store.search("papers", query_prefixes, 10)
        expected = exact_top(vectors[2:], ids[2:], query_prefixes, 10)
        found = sum(
            len({h.id for h in hits} & {i for i, _ in want}) for hits, want in zip(results, expected, strict=True)
        )
        assert found / (10 * len(queries)) >= 0.9, (kind, dimensions)
    store.close()


def test_milvus_refuses_a_uri_that_is_neither_a_server_nor_a_db_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        MilvusIndex(str(tmp_path / "milvus.sqlite"))


def test_milvus_unreachable_is_unavailable_and_keeps_credentials_out_of_the_message() -> None:
    with pytest.raises(MilvusUnavailableError) as raised:
        MilvusIndex("http://reader:secret@127.0.0.1:1")
    assert raised.value.code.name == "UNAVAILABLE"
    assert "127.0.0.1:1" in str(raised.value) and "secret" not in str(raised.value)
