"""The embedded store: vectors in an append-only file, passages in SQLite (WAL), search with FAISS.

<data dir>/.lock is held (a POSIX lock) by the one process that has the store open.

Layout of a collection, under <data dir>/<name>/:
    collection.sqlite   passages(row, id, title, text, metadata), meta(key, value), and passages_fts,
                        an FTS5 index of title and text (external content: it stores no text twice)
                        kept by triggers on passages, so it is written in the very transaction that
                        writes the passages: acknowledged means findable both ways, and a delete
                        removes from both
    vectors.bin         row i = vector of SQLite row i: full dimension, float16 or float32, little-endian

Commit protocol of an upsert (all under the collection's lock):
    1. append the new vectors at rows [n, n + k) of vectors.bin and fsync it;
    2. in one SQLite transaction: drop the replaced ids, insert the passages at rows n.., set
       meta.vector_rows = n + k, COMMIT (synchronous=FULL): this commit is the point of truth;
    3. update the in-memory indexes;
    4. only then does the caller acknowledge.
A crash before 2 leaves extra rows at the end of vectors.bin: on open they are cut off (repair).
A crash after 2 loses nothing. vectors.bin shorter than meta.vector_rows cannot come from a crash
(1 is fsynced before 2); such a collection is refused with CorruptCollectionError, never half served,
while the others are served; deleting it is allowed.

A collection is created in .creating-<name> and deleted as .deleting-<name>, each renamed in one step
and the rename fsynced; leftovers of an interrupted create or delete are removed on open.

A collection made before the lexical index existed gets it on open, built in one transaction from
the stored passages: 2.6 s for 100,000 abstract-length passages (bench/search.py --modes, quiet CPU),
about 30 s at 1M (extrapolated linearly, not measured), while opening.

Filters are SQL over the metadata JSON; a range reads values with `scholarembed_number`, a
function registered on the connection that applies base.as_number, so every store agrees.

Replaced and deleted passages leave dead rows in vectors.bin; searches skip them with a FAISS
IDSelector over the live rows. Vectors are stored at full dimension; an index per searched
Matryoshka dimension is built from the stored prefix, re-normalised, on first use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np

from ..errors import ScholarEmbedError
from .base import (
    AnyOf,
    CollectionInfo,
    CollectionNotFoundError,
    Condition,
    CorruptCollectionError,
    Equals,
    Hit,
    IndexKind,
    LexicalUnavailableError,
    MetadataFilter,
    Range,
    StorageError,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    as_number,
    check_collection_name,
    conditions_of,
    prefix_normalised,
)

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536  # rows converted at a time when (re)building an index: bounded extra memory
IVF_MIN_TRAINING_ROWS = 4096  # below this an IVF collection is searched exactly

LEXICAL_SCHEMA = """
CREATE VIRTUAL TABLE passages_fts USING fts5(
    title, text, content='passages', content_rowid='row', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER passages_fts_insert AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts (rowid, title, text) VALUES (new.row, new.title, new.text);
END;
CREATE TRIGGER passages_fts_delete AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts (passages_fts, rowid, title, text) VALUES ('delete', old.row, old.title, old.text);
END;
"""


class _Collection:
    """One collection on disk and its in-memory indexes. All public methods take `lock`."""

    def __init__(self, folder: Path, search_device: str = "cpu") -> None:
        self.folder = folder
        self.name = folder.name
        self.lock = threading.RLock()
        self.db = sqlite3.connect(folder / "collection.sqlite", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.create_function("scholarembed_number", 1, as_number, deterministic=True)
        # Queries are split into words by FTS5's own tokenizer (its Unicode tables are not Python's),
        # in a temporary table of this connection: the collection's files are never touched.
        self.db.execute(
            "CREATE VIRTUAL TABLE temp.query_words USING fts5(query, tokenize='unicode61 remove_diacritics 2')"
        )
        self.db.execute("CREATE VIRTUAL TABLE temp.query_vocabulary USING fts5vocab(temp, query_words, row)")
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        self.dimensions = int(meta["dimensions"])
        self.model = meta["model"]
        self.index_kind = IndexKind(meta["index_kind"])
        self.storage = VectorStorage(meta["vector_storage"])
        self.dtype = np.dtype("<f2" if self.storage is VectorStorage.FLOAT16 else "<f4")
        self.row_bytes = self.dimensions * self.dtype.itemsize
        self.vector_rows = int(meta["vector_rows"])
        self.vectors_path = folder / "vectors.bin"
        self.search_device = search_device
        self.closed = False
        self.lexical_unavailable: str | None = None  # why lexical search cannot be served, if it cannot
        try:
            self._check_and_repair()
            self._add_lexical_index()
        except CorruptCollectionError:
            self.db.close()
            raise
        live_rows = np.fromiter((row for (row,) in self.db.execute("SELECT row FROM passages")), dtype=np.int64)
        self.live = np.zeros(self.vector_rows, dtype=bool)
        self.live[live_rows] = True
        self.passage_count = int(live_rows.size)
        self._indexes: dict[int, Any] = {}  # searched dimension -> FAISS index (or torch matrix)

    # -- opening -----------------------------------------------------------------------------------

    def _check_and_repair(self) -> None:
        size = self.vectors_path.stat().st_size if self.vectors_path.exists() else 0
        committed = self.vector_rows * self.row_bytes
        if size < committed:
            raise CorruptCollectionError(
                f"collection {self.name!r}: vectors.bin holds {size // self.row_bytes} rows but the database "
                f"committed {self.vector_rows}; it cannot be served (restore it from a backup or delete it)"
            )
        if size > committed:
            log.warning(
                "collection %r: cutting %d uncommitted bytes off vectors.bin (interrupted write)", self.name,
                size - committed,
            )  # fmt: skip
            with self.vectors_path.open("r+b") as vectors:
                vectors.truncate(committed)
                os.fsync(vectors.fileno())
        (max_row,) = self.db.execute("SELECT MAX(row) FROM passages").fetchone()
        if max_row is not None and max_row >= self.vector_rows:
            raise CorruptCollectionError(
                f"collection {self.name!r}: passage row {max_row} has no vector (only {self.vector_rows} committed)"
            )

    def _add_lexical_index(self) -> None:
        """Index the passages of a collection made before lexical search, all in one transaction."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'passages_fts'").fetchone():
            return
        started = time.perf_counter()
        try:
            self.db.executescript(
                f"BEGIN IMMEDIATE; {LEXICAL_SCHEMA}; "
                "INSERT INTO passages_fts (passages_fts) VALUES ('rebuild'); COMMIT;"
            )
        except sqlite3.Error as error:  # e.g. a full disk: dense search still works, lexical says why not
            self._rollback()
            self.lexical_unavailable = f"collection {self.name!r}: its lexical index could not be built: {error}"
            log.error("%s", self.lexical_unavailable)
            return
        log.info(
            "collection %r: built the lexical index of its passages in %.1f s", self.name,
            time.perf_counter() - started,
        )  # fmt: skip

    def stored_vectors(self) -> np.ndarray:
        """All committed rows, memory-mapped: opening a large collection reads nothing up front."""
        if self.vector_rows == 0:
            return np.zeros((0, self.dimensions), dtype=self.dtype)
        return np.memmap(self.vectors_path, dtype=self.dtype, mode="r", shape=(self.vector_rows, self.dimensions))

    def info(self) -> CollectionInfo:
        return CollectionInfo(self.name, self.passage_count, self.dimensions, self.index_kind, self.storage, self.model)

    # -- writing -----------------------------------------------------------------------------------

    def upsert(self, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        with self.lock:
            self._check_open()
            start = self.vector_rows
            stored = np.ascontiguousarray(vectors, dtype=self.dtype)  # what a reopened store will read back
            try:
                self._append_vectors(start, stored)
                replaced = self._commit_rows(start, passages)
            except OSError as error:
                self._discard_tail(start)
                raise StorageError(f"collection {self.name!r}: write failed, nothing stored: {error}") from error
            except sqlite3.Error as error:
                self._discard_tail(start)
                raise StorageError(f"collection {self.name!r}: database write failed: {error}") from error
            self.vector_rows = start + len(passages)
            self.live = np.concatenate([self.live, np.ones(len(passages), dtype=bool)])
            self.live[replaced] = False
            self.passage_count += len(passages) - len(replaced)
            for dimensions, index in self._indexes.items():
                self._add_to_index(index, dimensions, stored)
            return len(passages)

    def _append_vectors(self, start: int, stored: np.ndarray) -> None:
        data = stored.tobytes()
        with self.vectors_path.open("r+b" if self.vectors_path.exists() else "wb") as file:
            file.truncate(start * self.row_bytes)  # drop leftovers of an earlier failed write
            file.seek(start * self.row_bytes)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def _commit_rows(self, start: int, passages: Sequence[StoredPassage]) -> list[int]:
        ids = [p.id for p in passages]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            replaced = _rows_of(self.db, ids)
            self.db.executemany("DELETE FROM passages WHERE id = ?", [(i,) for i in ids])
            self.db.executemany(
                "INSERT INTO passages (row, id, title, text, metadata) VALUES (?, ?, ?, ?, ?)",
                [
                    (start + offset, p.id, p.title, p.text, json.dumps(dict(p.metadata), ensure_ascii=False))
                    for offset, p in enumerate(passages)
                ],
            )
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'vector_rows'", (str(start + len(passages)),))
            self.db.execute("COMMIT")  # the point of truth
        except BaseException:
            self._rollback()
            raise
        return replaced

    def _discard_tail(self, start: int) -> None:
        try:
            with self.vectors_path.open("r+b") as file:
                file.truncate(start * self.row_bytes)
        except OSError:
            log.exception(
                "collection %r: could not cut the failed write off vectors.bin; repaired on reopen", self.name
            )

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on some failed COMMITs)."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def _check_open(self) -> None:
        if self.closed:  # deleted while this call waited for the lock
            raise CollectionNotFoundError(self.name)

    def delete(self, ids: Sequence[str]) -> int:
        with self.lock:
            self._check_open()
            try:
                self.db.execute("BEGIN IMMEDIATE")
                rows = _rows_of(self.db, ids)
                self.db.executemany("DELETE FROM passages WHERE id = ?", [(i,) for i in ids])
                self.db.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise StorageError(f"collection {self.name!r}: delete failed, nothing deleted: {error}") from error
            except BaseException:
                self._rollback()
                raise
            self.live[rows] = False
            self.passage_count -= len(rows)
            return len(rows)

    def get(self, ids: Sequence[str]) -> list[StoredPassage]:
        with self.lock:
            self._check_open()
            found: dict[str, StoredPassage] = {}
            for start in range(0, len(ids), 900):
                chunk = list(ids[start : start + 900])
                query = f"SELECT id, title, text, metadata FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
                for id_, title, text, metadata in self.db.execute(query, chunk):
                    found[id_] = StoredPassage(id_, title, text, json.loads(metadata))
            return [found[i] for i in dict.fromkeys(ids) if i in found]

    # -- searching ---------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, top_k: int, conditions: Sequence[Condition], include_passages: bool
    ) -> list[list[Hit]]:
        with self.lock:
            self._check_open()
            dimensions = queries.shape[1]
            allowed = self._allowed_rows(conditions)
            if self.vector_rows == 0 or (allowed is not None and not allowed.any()):
                return [[] for _ in queries]
            index = self._index(dimensions)
            scores, rows = self._search_index(index, np.ascontiguousarray(queries, dtype=np.float32), top_k, allowed)
            return self._hits(scores, rows, include_passages)

    def lexical_search(
        self, queries: Sequence[str], top_k: int, conditions: Sequence[Condition], include_passages: bool
    ) -> list[list[Hit]]:
        where, parameters = _where(conditions)
        statement = (
            "SELECT passages.row, bm25(passages_fts) AS bm25 FROM passages_fts "
            f"JOIN passages ON passages.row = passages_fts.rowid WHERE passages_fts MATCH ? AND {where} "
            "ORDER BY bm25, passages.id LIMIT ?"
        )
        with self.lock:
            self._check_open()
            if self.lexical_unavailable is not None:
                raise LexicalUnavailableError(f"{self.lexical_unavailable}; it is retried when the server restarts")
            scores = np.zeros((len(queries), top_k), dtype=np.float32)
            rows = np.full((len(queries), top_k), -1, dtype=np.int64)
            for position, query in enumerate(queries):
                words = self._words(query)
                if not words:
                    continue
                # Each word quoted: FTS5 reads it as a string, never as syntax (AND, NEAR, *, ^, :, ...).
                expression = " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
                found = self.db.execute(statement, [expression, *parameters, top_k]).fetchall()
                rows[position, : len(found)] = [row for row, _ in found]
                scores[position, : len(found)] = [-bm25 for _, bm25 in found]  # FTS5: lower is better
            return self._hits(scores, rows, include_passages)

    def _words(self, query: str) -> list[str]:
        """The distinct words FTS5 finds in the query, lowercased and without diacritics."""
        self.db.execute("DELETE FROM temp.query_words")
        self.db.execute("INSERT INTO temp.query_words VALUES (?)", (query,))
        return [word for (word,) in self.db.execute("SELECT term FROM temp.query_vocabulary")]

    def _allowed_rows(self, conditions: Sequence[Condition]) -> np.ndarray | None:
        """Boolean mask of rows a hit may come from, or None when every row is live and there is no filter."""
        if not conditions:
            return None if self.passage_count == self.vector_rows else self.live
        where, parameters = _where(conditions)
        allowed = np.zeros(self.vector_rows, dtype=bool)
        rows = [row for (row,) in self.db.execute(f"SELECT row FROM passages WHERE {where}", parameters)]
        allowed[rows] = True
        return allowed

    def _index(self, dimensions: int) -> Any:
        if dimensions not in self._indexes:
            index = self._load_saved_index(dimensions) or self._new_index(dimensions)
            stored = self.stored_vectors()
            for start in range(index.ntotal, self.vector_rows, CHUNK_ROWS):
                self._add_to_index(index, dimensions, stored[start : start + CHUNK_ROWS])
            self._indexes[dimensions] = index
            self._save_index(dimensions, index)
        return self._indexes[dimensions]

    def _saved_index_path(self, dimensions: int) -> Path:
        return self.folder / f"{self.index_kind.value}-{dimensions}.faiss"

    def _load_saved_index(self, dimensions: int) -> Any:
        """An approximate index saved earlier (they are slow to build); rows added since are added on top.

        Rows are append-only and dead rows are filtered at search time, so an older saved index is
        still valid for the rows it covers.
        """
        path = self._saved_index_path(dimensions)
        if self.index_kind is IndexKind.FLAT or not path.exists():
            return None
        index = faiss.read_index(str(path))
        if index.ntotal > self.vector_rows:  # covers rows cut off as uncommitted: rebuild
            return None
        if self.index_kind is IndexKind.IVF:
            return _LazyIVF(dimensions, index)
        return index

    def _save_index(self, dimensions: int, index: Any) -> None:
        if self.index_kind is IndexKind.FLAT:
            return  # a flat index is rebuilt from vectors.bin in seconds; HNSW and IVF run on the CPU anywhere
        inner = index.index if isinstance(index, _LazyIVF) else index
        temporary = self._saved_index_path(dimensions).with_suffix(".tmp")
        faiss.write_index(inner, str(temporary))
        os.replace(temporary, self._saved_index_path(dimensions))

    def _new_index(self, dimensions: int) -> Any:
        if self.search_device != "cpu" and self.index_kind is IndexKind.FLAT:
            return _TorchFlat(dimensions, self.search_device)
        if self.index_kind is IndexKind.HNSW:
            index = faiss.IndexHNSWFlat(dimensions, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 128
            return index
        if self.index_kind is IndexKind.IVF:
            return _LazyIVF(dimensions)
        return faiss.IndexFlatIP(dimensions)

    def _add_to_index(self, index: Any, dimensions: int, vectors: np.ndarray) -> None:
        index.add(prefix_normalised(vectors, dimensions))

    def _search_index(
        self, index: Any, queries: np.ndarray, top_k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = min(top_k, self.vector_rows)
        if isinstance(index, _TorchFlat | _LazyIVF):
            return index.search(queries, k, allowed)
        params = None
        if allowed is not None:
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.vector_rows, faiss.swig_ptr(bitmap))
            params = (
                faiss.SearchParametersHNSW(sel=selector, efSearch=max(128, k))
                if isinstance(index, faiss.IndexHNSW)
                else faiss.SearchParameters(sel=selector)
            )
            scores, rows = index.search(queries, k, params=params)
            del bitmap  # the selector points into it: keep it alive until the search is done
            return scores, rows
        return index.search(queries, k)

    def _hits(self, scores: np.ndarray, rows: np.ndarray, include_passages: bool) -> list[list[Hit]]:
        wanted = sorted({int(r) for r in rows.ravel() if r >= 0})
        columns = "row, id, title, text, metadata" if include_passages else "row, id"
        records: dict[int, tuple[Any, ...]] = {}
        for start in range(0, len(wanted), 900):  # SQLite's bound-parameter limit
            chunk = wanted[start : start + 900]
            query = f"SELECT {columns} FROM passages WHERE row IN ({','.join('?' * len(chunk))})"
            records.update((record[0], record) for record in self.db.execute(query, chunk))
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

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for dimensions, index in self._indexes.items():
                self._save_index(dimensions, index)
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()


class _TorchFlat:
    """Exact search on a GPU: the stored prefix as one fp16 matrix, a matmul and a top-k."""

    def __init__(self, dimensions: int, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.matrix = torch.zeros((0, dimensions), dtype=torch.float16, device=self.device)

    @property
    def ntotal(self) -> int:
        return int(self.matrix.shape[0])

    def add(self, vectors: np.ndarray) -> None:
        block = self.torch.from_numpy(vectors).to(self.device, dtype=self.torch.float16)
        self.matrix = self.torch.cat([self.matrix, block])

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            query_matrix = torch.from_numpy(queries).to(self.device, dtype=torch.float16)
            scores = (query_matrix @ self.matrix.T).float()
            if allowed is not None:
                mask = torch.from_numpy(allowed).to(self.device)
                scores = scores.masked_fill(~mask, float("-inf"))
                k = min(k, int(allowed.sum()))
            top = torch.topk(scores, k, dim=1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()


class _LazyIVF:
    """IVF-Flat once there are enough rows to train it; exact search until then.

    Trained on the rows present when it is first built (at least IVF_MIN_TRAINING_ROWS), with
    sqrt(n) lists and nprobe = lists / 16: a recall-first setting, measured in bench/search.py.
    """

    def __init__(self, dimensions: int, index: Any = None) -> None:
        self.dimensions = dimensions
        self.index: Any = index if index is not None else faiss.IndexFlatIP(dimensions)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        if isinstance(self.index, faiss.IndexIVFFlat):
            self.index.add(vectors)
            return
        self.index.add(vectors)
        if self.index.ntotal >= IVF_MIN_TRAINING_ROWS:
            everything = self.index.reconstruct_n(0, self.index.ntotal)
            lists = max(16, int(np.sqrt(len(everything))))
            ivf = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(self.dimensions), self.dimensions, lists, faiss.METRIC_INNER_PRODUCT
            )
            ivf.train(everything)
            ivf.add(everything)
            ivf.nprobe = max(1, lists // 16)
            self.index = ivf

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            return self.index.search(queries, k)
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        params = (
            faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
            if isinstance(self.index, faiss.IndexIVFFlat)
            else faiss.SearchParameters(sel=selector)
        )
        result = self.index.search(queries, k, params=params)
        del bitmap
        return result


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


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _committed_passages(folder: Path) -> int:
    """Passages a refused collection's database holds; 0 if it cannot be read either."""
    try:
        db = sqlite3.connect(folder / "collection.sqlite")
        try:
            return int(db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def _rows_of(db: sqlite3.Connection, ids: Sequence[str]) -> list[int]:
    rows: list[int] = []
    for start in range(0, len(ids), 900):
        chunk = list(ids[start : start + 900])
        query = f"SELECT row FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
        rows += [row for (row,) in db.execute(query, chunk)]
    return rows


class DataDirInUseError(ScholarEmbedError):
    """Another process (a running server, a `scholarembed load`) has the data directory open."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def _lock_data_dir(data_dir: Path) -> Any:
    """Hold a POSIX lock on <data_dir>/.lock for as long as the store is open. One process at a time:
    two writers would each append to vectors.bin unseen by the other. POSIX (not flock) locks belong to
    the process, so reopening in the same process, as tests that simulate a crash do, still works."""
    lock = (data_dir / ".lock").open("a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        raise DataDirInUseError(
            f"data dir {str(data_dir)!r} is in use by another process (a running server or a load); "
            "stop it first, load through that server, or give this one another folder (--data-dir)"
        ) from error
    return lock


class EmbeddedIndex(VectorIndex):
    """Collections under one data directory; the default store (`--data-dir`)."""

    def __init__(self, data_dir: str | Path, *, search_device: str = "cpu") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._data_dir_lock = _lock_data_dir(self.data_dir)
        self.search_device = search_device
        self._lock = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        self._refused: dict[str, str] = {}  # name -> why it cannot be served (CorruptCollectionError)
        for folder in sorted(self.data_dir.iterdir()):
            if folder.is_dir() and folder.name.startswith((".creating-", ".deleting-")):
                log.warning("removing %s, left by an interrupted create or delete", folder)
                shutil.rmtree(folder)
            elif (folder / "collection.sqlite").exists():
                try:
                    self._collections[folder.name] = _Collection(folder, search_device)
                except CorruptCollectionError as error:
                    log.error("refusing collection %r: %s", folder.name, error)
                    self._refused[folder.name] = str(error)
                    continue
                log.info("opened collection %r: %d passages", folder.name, self._collections[folder.name].passage_count)

    def _get(self, name: str) -> _Collection:
        check_collection_name(name)
        collection = self._collections.get(name)
        if collection is None:
            if name in self._refused:
                raise CorruptCollectionError(self._refused[name])
            raise CollectionNotFoundError(name)
        return collection

    def create_collection(
        self, name: str, *, dimensions: int, model: str, index_kind: IndexKind, vector_storage: VectorStorage
    ) -> CollectionInfo:
        check_collection_name(name)
        with self._lock:
            if name in self._collections:
                return self._collections[name].info()
            if name in self._refused:
                raise CorruptCollectionError(self._refused[name])
            folder = self.data_dir / name
            staging = self.data_dir / f".creating-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            db = sqlite3.connect(staging / "collection.sqlite", isolation_level=None)
            db.executescript(
                """
                PRAGMA journal_mode=WAL;
                CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE passages (
                    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
                    text TEXT NOT NULL, metadata TEXT NOT NULL
                );
                """
                + LEXICAL_SCHEMA
            )
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("dimensions", str(dimensions)), ("model", model), ("index_kind", index_kind.value),
                 ("vector_storage", vector_storage.value), ("vector_rows", "0")],
            )  # fmt: skip
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
            (staging / "vectors.bin").touch()
            os.replace(staging, folder)  # a collection appears whole or not at all
            _fsync_directory(self.data_dir)
            self._collections[name] = _Collection(folder, self.search_device)
            return self._collections[name].info()

    def get_collection(self, name: str) -> CollectionInfo:
        return self._get(name).info()

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            collections = [self._collections[name] for name in sorted(self._collections)]
        return [collection.info() for collection in collections]

    def delete_collection(self, name: str) -> int:
        check_collection_name(name)
        with self._lock:
            if name in self._refused:
                count = _committed_passages(self.data_dir / name)
                self._remove_folder(name)
                del self._refused[name]
                return count
        collection = self._get(name)
        with self._lock, collection.lock:
            if self._collections.get(name) is not collection:
                raise CollectionNotFoundError(name)  # deleted by a concurrent call
            count = collection.passage_count
            collection.close()
            del self._collections[name]
            self._remove_folder(name)
            return count

    def _remove_folder(self, name: str) -> None:
        trash = self.data_dir / f".deleting-{name}"
        os.replace(self.data_dir / name, trash)
        _fsync_directory(self.data_dir)  # the delete is done once the rename is on disk
        shutil.rmtree(trash)

    def upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        return self._get(name).upsert(passages, vectors)

    def delete(self, name: str, ids: Sequence[str]) -> int:
        return self._get(name).delete(ids)

    def get(self, name: str, ids: Sequence[str]) -> list[StoredPassage]:
        return self._get(name).get(ids)

    def search(
        self,
        name: str,
        queries: np.ndarray,
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        return self._get(name).search(queries, top_k, conditions_of(metadata_filter), include_passages)

    def lexical_search(
        self,
        name: str,
        queries: Sequence[str],
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        return self._get(name).lexical_search(queries, top_k, conditions_of(metadata_filter), include_passages)

    def close(self) -> None:
        with self._lock:
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()
            self._data_dir_lock.close()
