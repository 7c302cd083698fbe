"""The embedded store's readers, writers and derived files (issues 19 and 21).

Readers never wait behind a writer: a search during a held commit (an fsync that waits for an event)
and during a held index build completes, exactly. Derived files survive a crash: a torn saved FAISS
index, or a torn tantivy index, is rebuilt from the source of truth with a log line. The flat matrix
grows into spare capacity, keeps the storage dtype on a GPU, and never moves what a reader holds.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex, collection, vectors
from scholarembed_server.index.embedded.vectors import TorchFlat, VectorIndexes

DIMENSIONS = 32
WAIT_S = 120  # a deadline for events that come at once; never a speed claim


def unit_vectors(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, DIMENSIONS)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def passages(count: int, start: int = 0) -> list[StoredPassage]:
    return [
        StoredPassage(f"p{i}", "", f"passage zqx{i:05d}", {"parity": str(i % 2)}) for i in range(start, start + count)
    ]


def store_with(
    path: Path, count: int, kind: IndexKind = IndexKind.FLAT, **options: str
) -> tuple[EmbeddedIndex, np.ndarray]:
    store = EmbeddedIndex(path, **options)
    store.create_collection(
        "c", dimensions=DIMENSIONS, model="m", index_kind=kind, vector_storage=VectorStorage.FLOAT32
    )
    vectors_ = unit_vectors(count, seed=count)
    store.upsert("c", passages(count), vectors_)
    return store, vectors_


def exact_ids(vectors_: np.ndarray, queries: np.ndarray, k: int, dimensions: int = DIMENSIONS) -> list[list[str]]:
    """numpy brute force on the re-normalised prefix."""
    head = vectors_[:, :dimensions] / np.linalg.norm(vectors_[:, :dimensions], axis=1, keepdims=True)
    query = queries[:, :dimensions] / np.linalg.norm(queries[:, :dimensions], axis=1, keepdims=True)
    return [[f"p{j}" for j in np.argsort(-row, kind="stable")[:k]] for row in query @ head.T]


def ids(results: list) -> list[list[str]]:
    return [[hit.id for hit in hits] for hits in results]


def test_a_search_during_a_held_commit_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, vectors_ = store_with(tmp_path, 200)
    queries = unit_vectors(3, seed=1)
    store.search("c", queries, 5)  # the flat index exists
    held, release = threading.Event(), threading.Event()
    fsync = os.fsync

    def held_fsync(descriptor: int) -> None:
        if threading.current_thread().name.startswith("writer"):
            held.set()
            assert release.wait(WAIT_S)
        fsync(descriptor)

    monkeypatch.setattr(collection.os, "fsync", held_fsync)
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as writer:
        upsert = writer.submit(store.upsert, "c", passages(50, start=200), unit_vectors(50, seed=2))
        assert held.wait(WAIT_S)  # the writer holds the write lock, inside step 1 of the commit
        assert ids(store.search("c", queries, 5)) == exact_ids(vectors_, queries, 5)
        assert ids(store.search("c", queries[:, :16], 5)) == exact_ids(vectors_, queries, 5, 16)  # a new dimension
        assert ids(store.lexical_search("c", ["zqx00007"], 5)) == [["p7"]]
        assert [p.id for p in store.get("c", ["p3", "p210"])] == ["p3"]
        assert store.get_collection("c").passage_count == 200
        assert not upsert.done()
        release.set()
        assert upsert.result(WAIT_S) == 50
    assert ids(store.lexical_search("c", ["zqx00210"], 5)) == [["p210"]]
    store.close()


@pytest.mark.parametrize("kind", [IndexKind.FLAT, IndexKind.HNSW])
def test_a_search_during_a_held_index_build_is_exact_and_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: IndexKind
) -> None:
    store, vectors_ = store_with(tmp_path, 300, kind)
    building, release = threading.Event(), threading.Event()
    extend = VectorIndexes._extended

    def held_build(self: VectorIndexes, *args: object, **kwargs: object) -> object:
        building.set()
        assert release.wait(WAIT_S)
        return extend(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndexes, "_extended", held_build)
    queries = unit_vectors(4, seed=3)
    assert ids(store.search("c", queries, 10)) == exact_ids(vectors_, queries, 10)  # asks for the index
    assert building.wait(WAIT_S)
    assert store._collections["c"].vectors._ready == {}  # the build is held
    assert ids(store.search("c", queries, 10)) == exact_ids(vectors_, queries, 10)
    assert store.upsert("c", passages(5, start=300), unit_vectors(5, seed=4)) == 5  # nor does it hold writers
    release.set()
    store.wait_until_indexed("c", [DIMENSIONS])
    assert store._collections["c"].vectors._ready[DIMENSIONS].rows >= 300
    everything = np.concatenate([vectors_, unit_vectors(5, seed=4)])
    found = ids(store.search("c", queries, 10))
    expected = exact_ids(everything, queries, 10)
    assert sum(len(set(f) & set(e)) for f, e in zip(found, expected, strict=True)) >= 0.9 * 40
    store.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another kind"])
def test_a_torn_saved_index_is_rebuilt_from_the_vectors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store, vectors_ = store_with(tmp_path, 400, IndexKind.HNSW)
    store.wait_until_indexed("c", [DIMENSIONS])
    store.close()
    saved = tmp_path / "c" / f"hnsw-{DIMENSIONS}.faiss"
    if damage == "truncated":
        with saved.open("r+b") as file:
            file.truncate(saved.stat().st_size // 2)
    elif damage == "garbage":
        saved.write_bytes(os.urandom(4096))
    else:
        vectors.faiss.write_index(vectors.faiss.IndexFlatIP(DIMENSIONS), str(saved))

    with caplog.at_level(logging.WARNING, logger="scholarembed_server.index.embedded"):
        store = EmbeddedIndex(tmp_path)
        queries = vectors_[:5]
        assert ids(store.search("c", queries, 1)) == [[f"p{i}"] for i in range(5)]  # exact meanwhile
        store.wait_until_indexed("c", [DIMENSIONS])
    assert f"hnsw-{DIMENSIONS}.faiss" in caplog.text and "rebuilding it from the vectors" in caplog.text
    assert ids(store.search("c", queries, 1)) == [[f"p{i}"] for i in range(5)]
    assert isinstance(store._collections["c"].vectors._ready[DIMENSIONS].index, vectors.faiss.IndexHNSW)
    store.close()
    assert vectors.faiss.read_index(str(saved)).ntotal == 400  # saved whole again


@pytest.mark.parametrize("damage", ["meta.json", "segments", "folder", "out of step"])
def test_a_torn_lexical_index_is_rebuilt_from_sqlite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store, _ = store_with(tmp_path, 120)
    store.delete("c", ["p5"])
    store.close()
    folder = tmp_path / "c" / "lexical"
    gone = {5}
    if damage == "meta.json":
        (folder / "meta.json").write_text("{torn")
    elif damage == "segments":
        for segment_file in folder.glob("*.idx"):
            segment_file.unlink()
    elif damage == "folder":
        shutil.rmtree(folder)
    else:  # SQLite restored from an older backup, say: one passage fewer than the index holds
        db = sqlite3.connect(tmp_path / "c" / "collection.sqlite")
        db.execute("DELETE FROM passages WHERE id = 'p7'")
        db.commit()
        db.close()
        gone.add(7)
    with caplog.at_level(logging.WARNING, logger="scholarembed_server.index.embedded"):
        store = EmbeddedIndex(tmp_path)
    assert "rebuilding it" in caplog.text
    words = [f"zqx{i:05d}" for i in range(120)]
    assert ids(store.lexical_search("c", words, 2)) == [[] if i in gone else [f"p{i}"] for i in range(120)]
    store.close()


def test_the_flat_matrix_grows_into_spare_capacity_and_never_moves_a_readers_view() -> None:
    rows = np.random.default_rng(5).normal(size=(5000, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    view = TorchFlat.empty(8, "cpu", torch.float16)
    views, tensors = [], set()
    for start in range(0, 5000, 7):
        view = view.extended(rows[start : start + 7])
        views.append(view)
        tensors.add(view.storage.data_ptr())
    assert view.rows == 5000 and view.storage.dtype == torch.float16
    # Grown by half each time it was full: O(log n) copies, not one per write.
    assert len(tensors) <= 2 + math.ceil(math.log(5000 / vectors.FLAT_MIN_CAPACITY, 1.5))
    early = views[10]  # a reader's view from long ago still reads exactly its rows
    assert early.rows == 77
    np.testing.assert_allclose(early.storage[:77].float().numpy(), rows[:77], atol=1e-2)
    _, found = early.search(rows[70:77], 1, None)
    assert found.ravel().tolist() == list(range(70, 77))


@pytest.mark.parametrize("storage", [VectorStorage.FLOAT16, VectorStorage.FLOAT32])
@pytest.mark.gpu
def test_gpu_flat_search_keeps_the_storage_dtype(tmp_path: Path, storage: VectorStorage) -> None:
    store = EmbeddedIndex(tmp_path, search_device="cuda:0")
    store.create_collection("c", dimensions=DIMENSIONS, model="m", index_kind=IndexKind.FLAT, vector_storage=storage)
    vectors_ = unit_vectors(3000, seed=6)
    store.upsert("c", passages(3000), vectors_)
    store.wait_until_indexed("c", [DIMENSIONS])
    for start in range(0, 2000, 100):  # writes after the build grow the matrix in place
        store.upsert("c", passages(100, start=3000 + start), unit_vectors(100, seed=7 + start))
    store.wait_until_indexed("c", [DIMENSIONS])
    flat = store._collections["c"].vectors._ready[DIMENSIONS]
    assert isinstance(flat, TorchFlat) and flat.rows == 5000
    assert flat.storage.device.type == "cuda"
    assert flat.storage.dtype == (torch.float16 if storage is VectorStorage.FLOAT16 else torch.float32)
    queries = vectors_[:8]
    assert ids(store.search("c", queries, 1)) == [[f"p{i}"] for i in range(8)]
    store.close()


def test_rows_added_after_an_approximate_index_are_searched_from_its_tail_not_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows committed after an HNSW index was built wait in its exact tail until ANN_TAIL_ROWS of them are
    there: once the builder has them, a search reads nothing from vectors.bin (no per-search re-normalising
    of the rows the index lacks); past the threshold they go into a copy of the FAISS index."""
    monkeypatch.setattr(vectors, "ANN_TAIL_ROWS", 50)
    store, vectors_ = store_with(tmp_path, 300, IndexKind.HNSW)
    store.wait_until_indexed("c", [DIMENSIONS])
    added = unit_vectors(20, seed=7)
    store.upsert("c", passages(20, start=300), added)
    store.wait_until_indexed("c", [DIMENSIONS])
    index = store._collections["c"].vectors._ready[DIMENSIONS]
    assert (index.indexed_rows, index.tail.rows) == (300, 20)

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("searched vectors.bin: the index should cover every row")

    monkeypatch.setattr(vectors, "exact_scan", no_scan)
    everything = np.concatenate([vectors_, added])
    queries = everything[[0, 150, 305, 319]]
    assert ids(store.search("c", queries, 3)) == exact_ids(everything, queries, 3)
    store.upsert("c", passages(40, start=320), unit_vectors(40, seed=8))
    store.wait_until_indexed("c", [DIMENSIONS])
    index = store._collections["c"].vectors._ready[DIMENSIONS]
    assert (index.indexed_rows, index.tail.rows) == (360, 0)
    store.close()
