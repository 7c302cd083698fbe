"""One collection of the embedded store: its files, its commit protocol, and searches over a snapshot.

Layout, under <data dir>/<name>/:
    collection.sqlite   the one source of truth (WAL, synchronous=FULL): passages(row, id, title,
                        text, metadata), meta(key, value), lexical_outbox(seq, id)
    vectors.bin         row i = vector of SQLite row i: full dimension, float16 or float32, little-endian
    lexical/            the tantivy index of the passages (lexical.py), derived from SQLite
    <kind>-<d>.faiss    saved HNSW/IVF indexes (vectors.py), derived from vectors.bin

Commit protocol of a write (under the collection's write lock, which only writers take):
    1. append the new vectors at rows [n, n + k) of vectors.bin and fsync it;
    2. in one SQLite transaction: drop the replaced ids, insert the passages at rows n.., append
       their ids to lexical_outbox, set meta.vector_rows = n + k, COMMIT: the point of truth;
    3. publish a new snapshot (rows, live rows, passage count) by swapping one reference;
    then, outside the write lock:
    4. catch the lexical index up to this write's outbox entries (a group commit, lexical.py);
    5. only then does the caller acknowledge: the passages are durable, and searchable both ways.
A crash before 2 leaves extra rows at the end of vectors.bin: on open they are cut off (repair).
A crash after 2 loses nothing: the outbox is replayed on open. vectors.bin shorter than
meta.vector_rows cannot come from a crash (1 is fsynced before 2); such a collection is refused
with CorruptCollectionError, never half served, while the others are served; deleting it is allowed.

Readers never wait behind a writer: a search takes the published snapshot by reference and a
database connection of its own (WAL readers do not block on the writer), and searches the rows of
that snapshot. Vector indexes are published the same way (vectors.py). A snapshot is never changed:
each write publishes a new one. A reader that meets rows its snapshot does not have, or rows
deleted since, leaves them out. Closing waits for the searches in progress.

Collections written before tantivy (an FTS5 index in collection.sqlite, or no lexical index at all)
are migrated on open: one transaction adds lexical_outbox and drops the FTS5 table and its
triggers; the lexical index, finding fewer documents than passages, rebuilds itself from SQLite,
logging its progress (lexical.py). Killed meanwhile, the next open resumes it.

Filters are SQL over the metadata JSON, for every search mode; a range reads values with
`scholarembed_number`, a function registered on each connection that applies base.as_number, so
every store agrees with `base.matches`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import (
    AnyOf,
    CollectionInfo,
    CollectionNotFoundError,
    CommittedUpsert,
    Condition,
    CorruptCollectionError,
    Equals,
    Hit,
    IndexKind,
    Range,
    StorageError,
    StoredPassage,
    VectorStorage,
    as_number,
)
from . import lexical
from .lexical import LexicalIndex
from .vectors import VectorIndexes

log = logging.getLogger(__name__)

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE passages (
    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, text TEXT NOT NULL, metadata TEXT NOT NULL
);
{lexical.OUTBOX_SCHEMA};
"""


@dataclass(frozen=True)
class Snapshot:
    """What a reader searches: the committed rows as of one write. Never changed once published."""

    rows: int
    live: np.ndarray  # one flag per row: False for replaced and deleted passages
    passage_count: int


def connect(path: Path, *, timeout: float = 60.0) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.create_function("scholarembed_number", 1, as_number, deterministic=True)
    return db


def create_files(
    folder: Path, *, dimensions: int, model: str, index_kind: IndexKind, vector_storage: VectorStorage
) -> None:
    """The files of an empty collection, in `folder` (a staging folder, renamed into place by the caller)."""
    db = connect(folder / "collection.sqlite")
    db.executescript("PRAGMA journal_mode=WAL;" + SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("dimensions", str(dimensions)), ("model", model), ("index_kind", index_kind.value),
         ("vector_storage", vector_storage.value), ("vector_rows", "0")],
    )  # fmt: skip
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    (folder / "vectors.bin").touch()


class Collection:
    """One collection on disk, its lexical index and its vector indexes. Thread-safe."""

    def __init__(self, folder: Path, search_device: str = "cpu") -> None:
        self.folder = folder
        self.name = folder.name
        self.path = folder / "collection.sqlite"
        self._write_lock = threading.Lock()  # writers only: held through fsync and COMMIT
        self._db = connect(self.path)  # the writers' connection
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        self.dimensions = int(meta["dimensions"])
        self.model = meta["model"]
        self.index_kind = IndexKind(meta["index_kind"])
        self.storage = VectorStorage(meta["vector_storage"])
        self.dtype = np.dtype("<f2" if self.storage is VectorStorage.FLOAT16 else "<f4")
        self.row_bytes = self.dimensions * self.dtype.itemsize
        self.vectors_path = folder / "vectors.bin"
        self._readers = threading.Condition()  # guards the three fields below, for a moment at a time
        self._active_readers = 0
        self._idle_connections: list[sqlite3.Connection] = []
        self._closed = False
        rows = int(meta["vector_rows"])
        try:
            self._check_and_repair(rows)
        except CorruptCollectionError:
            self._db.close()
            raise
        self._migrate_lexical()
        live_rows = np.fromiter((row for (row,) in self._db.execute("SELECT row FROM passages")), dtype=np.int64)
        live = np.zeros(rows, dtype=bool)
        live[live_rows] = True
        self._snapshot = Snapshot(rows, live, int(live_rows.size))
        self.lexical = LexicalIndex(folder / "lexical", self.name, connect(self.path))
        self.lexical.open_consistent(self._snapshot.passage_count)
        self.vectors = VectorIndexes(
            self.name, folder, kind=self.index_kind, dimensions=self.dimensions, dtype=self.dtype, rows=rows,
            search_device=search_device,
        )  # fmt: skip

    # -- opening -----------------------------------------------------------------------------------

    def _check_and_repair(self, rows: int) -> None:
        size = self.vectors_path.stat().st_size if self.vectors_path.exists() else 0
        committed = rows * self.row_bytes
        if size < committed:
            raise CorruptCollectionError(
                f"collection {self.name!r}: vectors.bin holds {size // self.row_bytes} rows but the database "
                f"committed {rows}; it cannot be served (restore it from a backup or delete it)"
            )
        if size > committed:
            log.warning(
                "collection %r: cutting %d uncommitted bytes off vectors.bin (interrupted write)", self.name,
                size - committed,
            )  # fmt: skip
            with self.vectors_path.open("r+b") as vectors:
                vectors.truncate(committed)
                os.fsync(vectors.fileno())
        (max_row,) = self._db.execute("SELECT MAX(row) FROM passages").fetchone()
        if max_row is not None and max_row >= rows:
            raise CorruptCollectionError(
                f"collection {self.name!r}: passage row {max_row} has no vector (only {rows} committed)"
            )

    def _migrate_lexical(self) -> None:
        """A collection written before tantivy gets an outbox, and loses its FTS5 index, in one transaction."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lexical_outbox'").fetchone():
            return
        started = time.perf_counter()
        try:
            with self._transaction():
                self._db.execute(lexical.OUTBOX_SCHEMA)
                self._db.execute("DROP TRIGGER IF EXISTS passages_fts_insert")
                self._db.execute("DROP TRIGGER IF EXISTS passages_fts_delete")
                self._db.execute("DROP TABLE IF EXISTS passages_fts")
        except sqlite3.Error as error:  # a full disk, say: nothing changed, and nothing can be written
            self._db.close()
            raise StorageError(f"collection {self.name!r}: could not move it off SQLite FTS5: {error}") from error
        log.info("collection %r: upgraded from a release before tantivy (its FTS5 index dropped) in %.1f s",
                 self.name, time.perf_counter() - started)  # fmt: skip

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back some failed COMMITs itself
                self._db.execute("ROLLBACK")
            raise

    def info(self) -> CollectionInfo:
        return CollectionInfo(
            self.name, self._snapshot.passage_count, self.dimensions, self.index_kind, self.storage, self.model
        )

    # -- writing -----------------------------------------------------------------------------------

    def upsert(self, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        committed = self.commit_upsert(passages, vectors)
        committed.wait_searchable()
        return committed.count

    def commit_upsert(self, passages: Sequence[StoredPassage], vectors: np.ndarray) -> CommittedUpsert:
        """Steps 1 to 3: durable when this returns; step 4 is `wait_searchable()` of the result."""
        stored = np.ascontiguousarray(vectors, dtype=self.dtype)  # what a reopened store will read back
        with self._write_lock:
            self._check_open()
            before = self._snapshot
            start = before.rows
            try:
                self._append_vectors(start, stored)
                replaced, seq = self._commit_rows(start, passages)
            except OSError as error:
                self._discard_tail(start)
                raise StorageError(f"collection {self.name!r}: write failed, nothing stored: {error}") from error
            except sqlite3.Error as error:
                self._discard_tail(start)
                raise StorageError(f"collection {self.name!r}: database write failed: {error}") from error
            live = np.concatenate([before.live, np.ones(len(passages), dtype=bool)])
            live[replaced] = False
            self._snapshot = Snapshot(start + len(passages), live, before.passage_count + len(passages) - len(replaced))
            self.vectors.committed(start + len(passages))
        return CommittedUpsert(len(passages), functools.partial(self.lexical.catch_up, seq))

    def _append_vectors(self, start: int, stored: np.ndarray) -> None:
        with self.vectors_path.open("r+b" if self.vectors_path.exists() else "wb") as file:
            file.truncate(start * self.row_bytes)  # drop leftovers of an earlier failed write
            file.seek(start * self.row_bytes)
            file.write(stored.tobytes())
            file.flush()
            os.fsync(file.fileno())

    def _commit_rows(self, start: int, passages: Sequence[StoredPassage]) -> tuple[list[int], int]:
        """Step 2: returns the replaced rows and the write's last outbox entry."""
        ids = [p.id for p in passages]
        with self._transaction():
            replaced = _rows_of(self._db, ids)
            self._db.executemany("DELETE FROM passages WHERE id = ?", [(i,) for i in ids])
            self._db.executemany(
                "INSERT INTO passages (row, id, title, text, metadata) VALUES (?, ?, ?, ?, ?)",
                [
                    (start + offset, p.id, p.title, p.text, json.dumps(dict(p.metadata), ensure_ascii=False))
                    for offset, p in enumerate(passages)
                ],
            )
            seq = lexical.enqueue(self._db, ids)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'vector_rows'", (str(start + len(passages)),))
        return replaced, seq

    def _discard_tail(self, start: int) -> None:
        try:
            with self.vectors_path.open("r+b") as file:
                file.truncate(start * self.row_bytes)
        except OSError:
            log.exception(
                "collection %r: could not cut the failed write off vectors.bin; repaired on reopen", self.name
            )

    def _check_open(self) -> None:
        if self._closed:  # deleted while this call waited
            raise CollectionNotFoundError(self.name)

    def delete(self, ids: Sequence[str]) -> int:
        with self._write_lock:
            self._check_open()
            before = self._snapshot
            try:
                with self._transaction():
                    rows = _rows_of(self._db, ids)
                    self._db.executemany("DELETE FROM passages WHERE id = ?", [(i,) for i in ids])
                    seq = lexical.enqueue(self._db, ids)
            except sqlite3.Error as error:
                raise StorageError(f"collection {self.name!r}: delete failed, nothing deleted: {error}") from error
            live = before.live.copy()
            live[rows] = False
            self._snapshot = Snapshot(before.rows, live, before.passage_count - len(rows))
        self.lexical.catch_up(seq)
        return len(rows)

    # -- reading -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[tuple[sqlite3.Connection, Snapshot]]:
        """A connection of this reader's own and the published snapshot; close() waits for readers."""
        with self._readers:
            self._check_open()
            self._active_readers += 1
            connection = self._idle_connections.pop() if self._idle_connections else None
        try:
            if connection is None:
                connection = connect(self.path)
                connection.execute("PRAGMA query_only=ON")
            yield connection, self._snapshot
        finally:
            with self._readers:
                if connection is not None:
                    self._idle_connections.append(connection)
                self._active_readers -= 1
                self._readers.notify_all()

    def get(self, ids: Sequence[str]) -> list[StoredPassage]:
        with self._reading() as (db, _):
            found: dict[str, StoredPassage] = {}
            for start in range(0, len(ids), 900):
                chunk = list(ids[start : start + 900])
                query = f"SELECT id, title, text, metadata FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
                for id_, title, text, metadata in db.execute(query, chunk):
                    found[id_] = StoredPassage(id_, title, text, json.loads(metadata))
            return [found[i] for i in dict.fromkeys(ids) if i in found]

    def search(
        self, queries: np.ndarray, top_k: int, conditions: Sequence[Condition], include_passages: bool
    ) -> list[list[Hit]]:
        with self._reading() as (db, snapshot):
            allowed = _allowed_rows(db, snapshot, conditions)
            if snapshot.rows == 0 or (allowed is not None and not allowed.any()):
                return [[] for _ in queries]
            queries = np.ascontiguousarray(queries, dtype=np.float32)
            scores, rows = self.vectors.search(queries, top_k, snapshot.rows, allowed)
            return _hits(db, scores, rows, include_passages)

    def lexical_search(
        self, queries: Sequence[str], top_k: int, conditions: Sequence[Condition], include_passages: bool
    ) -> list[list[Hit]]:
        with self._reading() as (db, snapshot):
            rows = None
            if conditions:
                rows = np.flatnonzero(_allowed_rows(db, snapshot, conditions))
                if not rows.size:
                    return [[] for _ in queries]
            found = self.lexical.search(queries, top_k, rows)
            scores = np.full((len(queries), top_k), -np.inf, dtype=np.float32)
            hit_rows = np.full((len(queries), top_k), -1, dtype=np.int64)
            for position, hits in enumerate(found):
                hit_rows[position, : len(hits)] = [row for row, _ in hits]
                scores[position, : len(hits)] = [score for _, score in hits]
            return _hits(db, scores, hit_rows, include_passages)

    def wait_until_indexed(self, dimensions: Sequence[int], timeout: float) -> None:
        self.vectors.wait_until_built(dimensions, timeout)

    def close(self) -> None:
        with self._write_lock, self._readers:
            if self._closed:
                return
            self._closed = True
            while self._active_readers:
                self._readers.wait()
        self.vectors.close()
        self.lexical.close()
        for connection in self._idle_connections:
            connection.close()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


def _allowed_rows(db: sqlite3.Connection, snapshot: Snapshot, conditions: Sequence[Condition]) -> np.ndarray | None:
    """Which of the snapshot's rows a hit may come from; None when every row is live and there is no filter."""
    if not conditions:
        return None if snapshot.passage_count == snapshot.rows else snapshot.live
    where, parameters = _where(conditions)
    rows = np.fromiter((row for (row,) in db.execute(f"SELECT row FROM passages WHERE {where}", parameters)), np.int64)
    allowed = np.zeros(snapshot.rows, dtype=bool)
    allowed[rows[rows < snapshot.rows]] = True  # rows written after the snapshot are not the reader's
    return allowed & snapshot.live


def _hits(db: sqlite3.Connection, scores: np.ndarray, rows: np.ndarray, include_passages: bool) -> list[list[Hit]]:
    """Hits for (scores, rows), leaving out rows no passage holds (now)."""
    wanted = sorted({int(r) for r in rows.ravel() if r >= 0})
    columns = "row, id, title, text, metadata" if include_passages else "row, id"
    records: dict[int, tuple[Any, ...]] = {}
    for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
        chunk = wanted[start : start + 900]
        query = f"SELECT {columns} FROM passages WHERE row IN ({','.join('?' * len(chunk))})"
        records.update((record[0], record) for record in db.execute(query, chunk))
    results = []
    for query_scores, query_rows in zip(scores, rows, strict=True):
        hits = []
        for score, row in zip(query_scores, query_rows, strict=True):
            record = records.get(int(row))
            if record is None:
                continue
            passage = (
                StoredPassage(record[1], record[2], record[3], json.loads(record[4])) if include_passages else None
            )
            hits.append(Hit(record[1], float(score), passage))
        results.append(hits)
    return results


def _where(conditions: Sequence[Condition]) -> tuple[str, list[Any]]:
    """An SQL condition on `passages` meeting every condition (base.matches), with its parameters."""
    clauses = ["1"]
    parameters: list[Any] = []
    for condition in conditions:
        test = "key = ?"
        parameters.append(condition.key)
        if isinstance(condition, Equals):
            test += " AND value = ?"
            parameters.append(condition.value)
        elif isinstance(condition, AnyOf):
            test += f" AND value IN ({','.join('?' * len(condition.values))})"
            parameters += condition.values
        elif isinstance(condition, Range):
            for operator, bound in (
                (">", condition.gt), (">=", condition.gte), ("<", condition.lt), ("<=", condition.lte)
            ):  # fmt: skip
                if bound is not None:
                    test += f" AND scholarembed_number(value) {operator} ?"
                    parameters.append(bound)
        clauses.append(f"EXISTS (SELECT 1 FROM json_each(passages.metadata) WHERE {test})")
    return " AND ".join(clauses), parameters


def _rows_of(db: sqlite3.Connection, ids: Sequence[str]) -> list[int]:
    rows: list[int] = []
    for start in range(0, len(ids), 900):
        chunk = list(ids[start : start + 900])
        query = f"SELECT row FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
        rows += [row for (row,) in db.execute(query, chunk)]
    return rows


def committed_passages(folder: Path) -> int:
    """Passages a refused collection's database holds; 0 if it cannot be read either."""
    try:
        db = sqlite3.connect(folder / "collection.sqlite")
        try:
            return int(db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0
