"""The embedded store's lexical index: tantivy, caught up from SQLite through an outbox (issue 19).

Migration from a data folder the previous release wrote (FTS5; tests/fixtures/fts5_store), kill -9 of a
real process inside a tantivy commit (while writing, and while migrating), replaying an outbox twice,
and what readers and writers see while a lexical commit is held. Commits are held and processes
killed at `lexical.before_commit`, the one test seam: a catch-up with its documents handed to tantivy's
writer and tantivy's commit not yet made.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for

from scholarembed_server.index.base import Equals, IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex, lexical
from scholarembed_server.index.embedded.vectors import VectorIndexes

FIXTURE = Path(__file__).parent / "fixtures" / "fts5_store"
_spec = importlib.util.spec_from_file_location("fts5_fixture", FIXTURE / "make.py")
assert _spec is not None and _spec.loader is not None
fts5_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fts5_fixture)

DIMENSIONS = 16
WAIT_S = 120  # a deadline for events that come at once; never a speed claim


def unit_vectors(count: int, seed: int, dimensions: int = DIMENSIONS) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def word(number: int) -> str:
    return f"zqx{number:05d}"  # one token, untouched by stemming, in no other passage


def passage(number: int, text: str = "a passage about proteins") -> StoredPassage:
    return StoredPassage(f"p{number}", f"title {number}", f"{text} {word(number)}", {"n": str(number)})


def found(store: EmbeddedIndex, name: str, words: list[str]) -> list[list[str]]:
    return [[hit.id for hit in hits] for hits in store.lexical_search(name, words, 3)]


def outbox(folder: Path) -> list[str]:
    db = sqlite3.connect(folder / "collection.sqlite")
    try:
        return [id_ for (id_,) in db.execute("SELECT id FROM lexical_outbox ORDER BY seq")]
    finally:
        db.close()


# -- migration from the previous release ----------------------------------------------------------------


def no_new_index(self: object, dimensions: int, stored: np.ndarray) -> None:
    raise AssertionError("the saved HNSW index should have been loaded")


def test_a_data_folder_written_with_fts5_is_migrated_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = shutil.copytree(FIXTURE / "data", tmp_path / "data")
    monkeypatch.setattr(VectorIndexes, "_new_approximate", no_new_index)
    with caplog.at_level(logging.INFO, logger="scholarembed_server.index.embedded"):
        store = EmbeddedIndex(data)
    try:
        infos = {
            info.name: (info.passage_count, info.index_kind, info.vector_storage) for info in store.list_collections()
        }
        assert infos == {
            "empty": (0, IndexKind.FLAT, VectorStorage.FLOAT32),
            "hnswed": (30, IndexKind.HNSW, VectorStorage.FLOAT16),
            "papers": (41, IndexKind.FLAT, VectorStorage.FLOAT32),
            "prelexical": (12, IndexKind.FLAT, VectorStorage.FLOAT32),
        }
        expected = {
            "papers": (fts5_fixture.PAPERS, fts5_fixture.PAPERS_VECTORS, 1e-5),
            "hnswed": (fts5_fixture.HNSWED, fts5_fixture.HNSWED_VECTORS, 2e-3),
            "prelexical": (fts5_fixture.PRELEXICAL, fts5_fixture.PRELEXICAL_VECTORS, 1e-5),
        }
        for name, (passages, vectors, tolerance) in expected.items():
            ids = [p[0] for p in passages]
            assert store.get(name, ids) == [StoredPassage(*p) for p in passages]
            words = [fts5_fixture.unique_word(name, int(id_[1:])) for id_ in ids if id_ != "p3" or name != "papers"]
            assert found(store, name, words) == [[id_] for id_ in ids if id_ != "p3" or name != "papers"]
            store.wait_until_indexed(name, [64, 32])  # hnswed: raises if its saved indexes were not reused
            for id_ in ids:
                (hits,) = store.search(name, vectors[id_][None, :], 1)
                assert hits[0].id == id_ and hits[0].score == pytest.approx(1.0, abs=tolerance)
        # The replaced passage is found by its new text only; the deleted one not at all.
        assert found(store, "papers", ["papuniq903", "papuniq003", "papuniq007", "telomerase"]) == [
            ["p3"],
            [],
            [],
            ["p3"],
        ]
        naive = store.lexical_search("papers", ["naive"], 50, metadata_filter=[Equals("venue", "nature")])
        assert {h.id for h in naive[0]} == {
            p[0] for p in fts5_fixture.PAPERS if "naïve" in p[1] + p[2] and p[3]["venue"] == "nature"
        }
        store.upsert("papers", [passage(1000)], unit_vectors(1, 1, 64))  # and it takes writes
        assert found(store, "papers", [word(1000)]) == [["p1000"]]
    finally:
        store.close()
    for name in ("papers", "hnswed", "prelexical"):
        db = sqlite3.connect(data / name / "collection.sqlite")
        assert db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'passages_fts%'").fetchall() == []
        db.close()
        assert outbox(data / name) == []
    assert caplog.text.count("upgraded from a release before tantivy") == 4
    assert caplog.text.count("rebuilding it") == 3  # every collection with passages; "empty" has nothing to index

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scholarembed_server.index.embedded"):
        store = EmbeddedIndex(data)  # a second open has nothing to migrate
    store.close()
    assert "FTS5" not in caplog.text and "rebuilding" not in caplog.text


MIGRATION_KILLED_AT_THIRD_COMMIT = """
import sys, threading
from scholarembed_server.index.embedded import EmbeddedIndex, lexical
lexical.CATCH_UP_CHUNK = 8
commits = []
def hold():
    commits.append(1)
    if len(commits) == 3:
        print("holding", flush=True)
        threading.Event().wait()
lexical.before_commit = hold
EmbeddedIndex(sys.argv[1])
"""


def test_a_migration_killed_midway_resumes_on_the_next_open(tmp_path: Path) -> None:
    data = shutil.copytree(FIXTURE / "data", tmp_path / "data")
    process = subprocess.Popen(
        [sys.executable, "-c", MIGRATION_KILLED_AT_THIRD_COMMIT, str(data)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "holding\n"
    process.send_signal(signal.SIGKILL)
    process.wait(WAIT_S)
    # Collections open in name order: "hnswed" (30 passages) was migrating, 8 outbox entries a commit, and
    # had two commits done; "papers" and "prelexical" were not reached.
    assert len(outbox(data / "hnswed")) == 30 - 16
    db = sqlite3.connect(data / "papers" / "collection.sqlite")
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'passages_fts'").fetchone() == (1,)
    db.close()

    store = EmbeddedIndex(data)
    try:
        for name, passages in (("hnswed", fts5_fixture.HNSWED), ("papers", fts5_fixture.PAPERS)):
            ids = [p[0] for p in passages if p[0] != "p3"]
            assert found(store, name, [fts5_fixture.unique_word(name, int(i[1:])) for i in ids]) == [[i] for i in ids]
    finally:
        store.close()


# -- kill -9 inside a catch-up -------------------------------------------------------------------------------

WRITER_KILLED_IN_A_COMMIT = """
import sys, threading
import numpy as np
from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex, lexical
commits = []
def hold():
    commits.append(1)
    if len(commits) == int(sys.argv[2]):
        print("holding", flush=True)
        threading.Event().wait()
lexical.before_commit = hold
store = EmbeddedIndex(sys.argv[1])
store.create_collection("crash", dimensions=16, model="m", index_kind=IndexKind.FLAT,
                        vector_storage=VectorStorage.FLOAT32)
rng = np.random.default_rng(0)
for batch in range(1000):
    numbers = range(batch * 20, batch * 20 + 20)
    store.upsert("crash", [StoredPassage(f"p{n}", "", f"text zqx{n:05d}") for n in numbers],
                 rng.normal(size=(20, 16)).astype(np.float32))
    print("acked", *(f"p{n}" for n in numbers), flush=True)
    if batch % 3 == 2:
        gone = [f"p{batch * 20 - 7}", f"p{batch * 20 + 3}"]
        store.delete("crash", gone)
        print("deleted", *gone, flush=True)
"""


@pytest.mark.parametrize("killed_at_commit", [1, 7])
def test_kill_9_inside_a_tantivy_commit_loses_nothing_and_replaying_twice_changes_nothing(
    tmp_path: Path, killed_at_commit: int
) -> None:
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER_KILLED_IN_A_COMMIT, str(data), str(killed_at_commit)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    acked: set[str] = set()
    deleted: set[str] = set()
    for line in process.stdout:
        kind, *ids = line.split()
        if kind == "holding":
            break
        (acked if kind == "acked" else deleted).update(ids)
    process.send_signal(signal.SIGKILL)
    process.wait(WAIT_S)
    left = outbox(data / "crash")
    assert left  # the write in progress: committed to SQLite, not yet to tantivy

    store = EmbeddedIndex(data)
    try:
        stored = {p.id for p in store.get("crash", [f"p{n}" for n in range(20 * 1000)])}
        assert acked - deleted <= stored and not deleted & stored
        numbers = range(max(int(i[1:]) for i in stored) + 1)
        first = found(store, "crash", [word(n) for n in numbers])
        assert {hits[0] for hits in first if hits} == stored  # every stored passage, by its own word; no other
        assert all(hits == [f"p{n}"] for n, hits in zip(numbers, first, strict=True) if hits)
    finally:
        store.close()
    assert outbox(data / "crash") == []

    db = sqlite3.connect(data / "crash" / "collection.sqlite")  # the same entries, applied once already
    db.executemany("INSERT INTO lexical_outbox (id) VALUES (?)", [(id_,) for id_ in left])
    db.commit()
    db.close()
    store = EmbeddedIndex(data)
    try:
        assert found(store, "crash", [word(n) for n in numbers]) == first
        assert store.get_collection("crash").passage_count == len(stored)
    finally:
        store.close()


# -- a held lexical commit -----------------------------------------------------------------------------------


def hold_the_first_lexical_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event, list[int]]:
    """(held, release, rounds): the first catch-up stops before tantivy's commit, sets `held` and waits for
    `release`; `rounds` counts the catch-ups that reached a commit."""
    held, release = threading.Event(), threading.Event()
    rounds: list[int] = []

    def hold() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            held.set()
            assert release.wait(WAIT_S)

    monkeypatch.setattr(lexical, "before_commit", hold)
    return held, release, rounds


def test_a_held_lexical_commit_blocks_no_reader_and_no_writer_and_is_group_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EmbeddedIndex(tmp_path)
    store.create_collection(
        "c", dimensions=DIMENSIONS, model="m", index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT32
    )
    vectors = unit_vectors(20, seed=1)
    store.upsert("c", [passage(n) for n in range(10)], vectors[:10])
    held, release, rounds = hold_the_first_lexical_commit(monkeypatch)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(store.upsert, "c", [passage(10)], vectors[10:11])
        assert held.wait(WAIT_S)
        # Committed to SQLite, not yet to tantivy: found densely and by id, not lexically yet.
        assert found(store, "c", [word(10), word(3)]) == [[], ["p3"]]
        assert store.search("c", vectors[10:11], 1)[0][0].id == "p10"
        assert [p.id for p in store.get("c", ["p10"])] == ["p10"]
        # Writers are not held either: a replacement and a delete commit meanwhile, and wait for their turn.
        second = pool.submit(store.upsert, "c", [passage(3, text="a replacement")], vectors[11:12])
        third = pool.submit(store.delete, "c", ["p4"])
        wait_for(lambda: store.get_collection("c").passage_count == 10, message="the delete did not commit")
        wait_for(lambda: store.get("c", ["p3"])[0].text.startswith("a replacement"), message="no replacement")
        # The replaced and the deleted versions are gone from lexical results at once; the new one comes next.
        assert found(store, "c", [word(3), word(4), "replacement"]) == [[], [], []]
        assert not first.done()
        release.set()
        assert (first.result(WAIT_S), second.result(WAIT_S), third.result(WAIT_S)) == (1, 1, 1)
    assert len(rounds) == 2  # the held round, then one tantivy commit for both writers that waited
    assert found(store, "c", [word(10), word(3), word(4), "replacement"]) == [["p10"], ["p3"], [], ["p3"]]
    store.close()


def test_requests_of_one_stream_commit_while_the_lexical_index_catches_up_and_share_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process_server
) -> None:
    """Over gRPC an upsert is acknowledged once it is searchable every way, but the next request of the
    stream commits while the lexical index catches up: the requests waiting behind a held tantivy commit
    are all made searchable by one more, instead of one commit each."""
    import grpc

    from scholarembed.v1 import search_pb2 as spb
    from scholarembed.v1 import search_pb2_grpc as spb_grpc

    held, release, rounds = hold_the_first_lexical_commit(monkeypatch)
    server = in_process_server(data_dir=str(tmp_path / "data"), stream_window=8)
    requests = [
        spb.UpsertPassagesRequest(
            request_id=str(n), collection="c", passages=[spb.Passage(id=f"p{n}", text=f"proteins {word(n)}")]
        )
        for n in range(6)
    ]
    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(1) as pool:
        stream = pool.submit(lambda: list(spb_grpc.SearchServiceStub(channel).UpsertPassages(iter(requests))))
        assert held.wait(WAIT_S)  # the first request's catch-up, held before tantivy's commit
        index = server.server.index
        wait_for(lambda: index.get_collection("c").passage_count == 6, message="the later requests did not commit")
        assert not stream.done()  # nothing is acknowledged before it is searchable
        release.set()
        responses = stream.result(WAIT_S)
    assert [(r.request_id, r.upserted) for r in responses] == [(str(n), 1) for n in range(6)]
    assert len(rounds) == 2  # the held round, then one tantivy commit for the five that waited
    assert found(index, "c", [word(n) for n in range(6)]) == [[f"p{n}"] for n in range(6)]


def test_stopwords_are_left_out_of_a_query_unless_it_has_nothing_else(tmp_path: Path) -> None:
    store = EmbeddedIndex(tmp_path)
    store.create_collection(
        "c", dimensions=DIMENSIONS, model="m", index_kind=IndexKind.FLAT, vector_storage=VectorStorage.FLOAT32
    )
    texts = ["the of and the of and to be", "a membrane", "The Membranes of the cell"]
    store.upsert("c", [StoredPassage(f"p{i}", "", text) for i, text in enumerate(texts)], unit_vectors(3, seed=2))
    assert found(store, "c", ["the membrane", "THE OF", "cells"]) == [["p1", "p2"], ["p2", "p0"], ["p2"]]
    store.close()
