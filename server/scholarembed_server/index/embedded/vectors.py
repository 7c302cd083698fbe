"""Vector search of one collection: an index per searched dimension, kept by a background thread.

Stored vectors are full-dimension rows of vectors.bin; a search at a Matryoshka dimension d uses each
row's first d components, re-normalised. The index at d covers rows [0, n) for some n: a flat matrix
(exact), or a FAISS HNSW or IVF index with an exact tail of the rows added since (approximate). Rows the
index does not cover yet (all of them, until it exists; those of the last commits, for a moment) are
searched exactly, straight from vectors.bin; the top-k lists are merged.
So a search never waits for an index: until one is ready, search at that dimension is exact.

Readers never wait behind a writer. A published index is never changed:
  - the flat matrix (`TorchFlat`) grows into spare capacity past the rows any published view reads,
    and by half its size (a new tensor) when full, so growing costs amortised O(1) copies a row;
  - an approximate index keeps the rows added since it was built in an exact tail (a `TorchFlat`), and
    is extended on a copy (`faiss.clone_index`) once ANN_TAIL_ROWS rows are there (`Approximate`);
and a reader takes the dict of published indexes once, by reference. One thread per collection
builds, extends and loads indexes, outside any lock a reader takes, and publishes each by swapping
that dict; it never holds the collection's write lock either, so it never delays a commit.

Flat indexes live next to the model: a GPU keeps the collection's storage dtype (float16 or
float32), the CPU float32. HNSW and IVF run on the CPU, and are saved as <kind>-<d>.faiss after
they are built and on close (write, fsync, rename, fsync the folder), since they are slow to build.
On open a saved index is reused for the rows it covers (rows are append-only, dead rows are
filtered at search time); one that cannot be read or does not fit the collection is rebuilt from
the vectors, with a log line. A build that fails is logged once; that dimension stays exact.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..base import IndexKind, prefix_normalised

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536  # rows converted at a time by an exact scan: bounded extra memory
BUILD_CHUNK_ROWS = 8192  # rows added to an index at a time; closing waits for at most one such step
IVF_MIN_TRAINING_ROWS = 4096  # below this an IVF collection is searched exactly
IVF_TRAINING_SAMPLE = 256  # training points per IVF list, as FAISS's k-means samples them anyway
ANN_TAIL_ROWS = 8192  # rows an approximate index keeps in its exact tail before adding them to FAISS
FLAT_MIN_CAPACITY = 1024

Scored = tuple[np.ndarray, np.ndarray]  # (scores, rows), each (queries, k), best first; row -1 pads


def top_k(queries: np.ndarray, matrix: torch.Tensor, k: int, allowed: np.ndarray | None, first_row: int = 0) -> Scored:
    """Exact inner-product top-k of `queries` over the rows of `matrix`, skipping rows not `allowed`."""
    k = min(k, matrix.shape[0], int(allowed.sum()) if allowed is not None else k)
    with torch.inference_mode():
        scores = (torch.from_numpy(queries).to(matrix.device, matrix.dtype) @ matrix.T).float()
        if allowed is not None:
            scores.masked_fill_(~torch.from_numpy(allowed).to(matrix.device), float("-inf"))
        top = torch.topk(scores, k, dim=1)
    return top.values.cpu().numpy(), top.indices.cpu().numpy() + first_row


def merged(parts: Sequence[Scored], k: int, queries: int) -> Scored:
    """The best k of several top-k lists of the same queries."""
    if not parts:
        return np.zeros((queries, 0), dtype=np.float32), np.zeros((queries, 0), dtype=np.int64)
    scores = np.concatenate([part[0] for part in parts], axis=1)
    rows = np.concatenate([part[1] for part in parts], axis=1)
    scores = np.where(rows < 0, -np.inf, scores)  # FAISS pads short lists with row -1
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def exact_scan(
    stored: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None, first_row: int = 0
) -> Scored:
    """Exact search straight from stored full-dimension rows (a memmap), a chunk at a time."""
    dimensions = queries.shape[1]
    parts = []
    for start in range(0, len(stored), CHUNK_ROWS):
        chunk_allowed = None if allowed is None else allowed[start : start + CHUNK_ROWS]
        if chunk_allowed is not None and not chunk_allowed.any():
            continue
        matrix = torch.from_numpy(prefix_normalised(stored[start : start + CHUNK_ROWS], dimensions))
        parts.append(top_k(queries, matrix, k, chunk_allowed, first_row + start))
    return merged(parts, k, len(queries))


class TorchFlat:
    """Exact search over prefix-normalised rows held in one tensor, on the CPU or a GPU.

    A view of its first `rows` rows: `extended` writes new rows past them and returns a new view,
    in the same tensor while it has room, else in one half as large again. Views already handed out
    never read the rows written after them, so readers need no lock.
    """

    def __init__(self, storage: torch.Tensor, rows: int) -> None:
        self.storage = storage
        self.rows = rows

    @classmethod
    def empty(cls, dimensions: int, device: str, dtype: torch.dtype, capacity: int = 0) -> TorchFlat:
        storage = torch.empty((max(capacity, FLAT_MIN_CAPACITY), dimensions), dtype=dtype, device=device)
        return cls(storage, 0)

    def extended(self, vectors: np.ndarray) -> TorchFlat:
        """A view with `vectors` (prefix-normalised float32 rows) after this one's rows."""
        rows = self.rows + len(vectors)
        storage = self.storage
        if rows > len(storage):
            capacity = max(rows, len(storage) + len(storage) // 2)
            storage = torch.empty((capacity, storage.shape[1]), dtype=storage.dtype, device=storage.device)
            storage[: self.rows] = self.storage[: self.rows]
        storage[self.rows : rows] = torch.from_numpy(vectors).to(storage.device, storage.dtype)
        return TorchFlat(storage, rows)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, first_row: int = 0) -> Scored:
        return top_k(queries, self.storage[: self.rows], k, allowed, first_row)


class Approximate:
    """A FAISS HNSW or IVF-Flat index of its first rows, and an exact `TorchFlat` tail of the rows added since;
    never changed once published.

    Rows are appended to the tail, a cheap copy, until ANN_TAIL_ROWS wait there; then they are added to a
    copy of the FAISS index (`faiss.clone_index`), which is slow, and the tail starts again. So a search
    never re-normalises rows from vectors.bin, and the FAISS index is copied once per ANN_TAIL_ROWS rows.
    """

    def __init__(self, index: Any, tail: TorchFlat | None = None) -> None:
        self.index = index
        self.tail = tail if tail is not None else TorchFlat.empty(index.d, "cpu", torch.float32)

    @property
    def indexed_rows(self) -> int:
        """Rows in the FAISS index: what a saved file holds."""
        return int(self.index.ntotal)

    @property
    def rows(self) -> int:
        return self.indexed_rows + self.tail.rows

    def extended(self, vectors: np.ndarray, *, in_place: bool = False) -> Approximate:
        """`vectors` (prefix-normalised float32 rows) appended: to the tail while it stays short of
        ANN_TAIL_ROWS, else with the tail to the FAISS index, a copy of it unless `in_place` (an index no
        reader has: one being built or already copied)."""
        if in_place and not self.tail.rows:
            self.index.add(vectors)
            return self
        tail = self.tail.extended(vectors)
        if tail.rows < ANN_TAIL_ROWS and not in_place:
            return Approximate(self.index, tail)
        index = self.index if in_place else faiss.clone_index(self.index)
        index.add(tail.storage[: tail.rows].numpy())
        return Approximate(index)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> Scored:
        indexed = self.indexed_rows
        index_allowed, tail_allowed = (None, None) if allowed is None else (allowed[:indexed], allowed[indexed:])
        parts = []
        if indexed:
            parts.append(self._search_index(queries, min(k, indexed), index_allowed))
        if self.tail.rows:
            parts.append(self.tail.search(queries, k, tail_allowed, first_row=indexed))
        return merged(parts, k, len(queries))

    def _search_index(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> Scored:
        if allowed is None:
            return self.index.search(queries, k)
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        if isinstance(self.index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(128, k))
        else:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
        found = self.index.search(queries, k, params=params)
        del bitmap  # the selector points into it: keep it alive until the search is done
        return found


VectorIndex = TorchFlat | Approximate


class _Closing(Exception):
    """The collection is closing: the build in progress stops at its next step."""


class VectorIndexes:
    """The vector indexes of one collection, one per searched dimension, and the thread that keeps them.

    `committed(rows)` after every write tells it how many rows vectors.bin holds for good; `search`
    answers from the published indexes plus an exact scan of the rest, and asks for an index it lacks.
    """

    def __init__(
        self,
        name: str,
        folder: Path,
        *,
        kind: IndexKind,
        dimensions: int,
        dtype: np.dtype,
        rows: int,
        search_device: str,
    ) -> None:
        self.name = name
        self.folder = folder
        self.kind = kind
        self.dimensions = dimensions
        self.dtype = dtype
        self.search_device = search_device
        self.flat_on_device = kind is IndexKind.FLAT and search_device != "cpu"
        self._rows = rows  # committed rows of vectors.bin, as the builder may read them
        self._ready: dict[int, VectorIndex] = {}  # published; replaced as a whole, never changed
        self._wanted: set[int] = set()  # dimensions searched at: the ones to index
        self._failed: dict[int, str] = {}  # dimension -> why its build failed (searched exactly)
        self._saved_rows: dict[int, int] = {}  # dimension -> rows of its saved file
        self._closing = False
        self._condition = threading.Condition()
        self._builder = threading.Thread(target=self._run, name=f"index-build-{name}", daemon=True)
        self._builder.start()

    # -- what the collection calls -----------------------------------------------------------------

    def committed(self, rows: int) -> None:
        with self._condition:
            self._rows = rows
            self._condition.notify_all()

    def stored(self, rows: int) -> np.ndarray:
        """The first `rows` committed rows, memory-mapped: nothing is read up front."""
        if rows == 0:
            return np.zeros((0, self.dimensions), dtype=self.dtype)
        return np.memmap(self.folder / "vectors.bin", dtype=self.dtype, mode="r", shape=(rows, self.dimensions))

    def search(self, queries: np.ndarray, k: int, visible_rows: int, allowed: np.ndarray | None) -> Scored:
        """Top-k among the first `visible_rows` rows (a reader's snapshot), of those `allowed` (None: all)."""
        dimensions = queries.shape[1]
        if dimensions not in self._wanted:
            with self._condition:
                self._wanted.add(dimensions)
                self._condition.notify_all()
        index = self._ready.get(dimensions)
        covered = min(index.rows, visible_rows) if index is not None else 0
        parts = []
        if index is not None and covered > 0:
            parts.append(index.search(queries, k, _mask(allowed, covered, index.rows)))
        if covered < visible_rows:
            tail_allowed = None if allowed is None else allowed[covered:visible_rows]
            parts.append(exact_scan(self.stored(visible_rows)[covered:], queries, k, tail_allowed, covered))
        return merged(parts, k, len(queries))

    def wait_until_built(self, dimensions: Sequence[int], timeout: float) -> None:
        """Ask for indexes at `dimensions` and return once the builder has nothing left to do for them.
        For benchmarks and tests, which measure or check the indexes rather than the exact scan."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._wanted.update(dimensions)
            self._condition.notify_all()
            while any(self._work_at(d) is not None for d in dimensions):
                if not self._condition.wait(deadline - time.monotonic()):
                    raise TimeoutError(
                        f"collection {self.name!r}: indexes at {list(dimensions)} not built in {timeout} s"
                    )
            failed = [self._failed[d] for d in dimensions if d in self._failed]
        if failed:
            raise RuntimeError(f"collection {self.name!r}: {failed[0]}")

    def close(self) -> None:
        """Stop the builder (a build in progress stops at its next step), then save approximate indexes."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._builder.join()
        for dimensions, index in self._ready.items():
            if isinstance(index, Approximate) and index.indexed_rows > self._saved_rows.get(dimensions, -1):
                self._save(dimensions, index)

    # -- the builder thread ------------------------------------------------------------------------

    def _work_at(self, dimensions: int) -> int | None:
        """Rows an index at `dimensions` should cover now, if the builder has work there (under the condition)."""
        if dimensions in self._failed:
            return None
        index = self._ready.get(dimensions)
        if index is None:
            enough = IVF_MIN_TRAINING_ROWS if self.kind is IndexKind.IVF else 1
            return self._rows if self._rows >= enough else None
        return self._rows if self._rows > index.rows else None

    def _run(self) -> None:
        while True:
            with self._condition:
                work = None
                while not self._closing:
                    work = next(
                        ((d, rows) for d in sorted(self._wanted) if (rows := self._work_at(d)) is not None), None
                    )
                    if work is not None:
                        break
                    self._condition.wait()
                if work is None:
                    return
                dimensions, rows = work
                current = self._ready.get(dimensions)
            try:
                index = self._built(dimensions, rows, current)
            except _Closing:
                return
            except Exception as error:
                log.exception("collection %r: building its index at %d dimensions failed; searched exactly", self.name,
                              dimensions)  # fmt: skip
                with self._condition:
                    self._failed[dimensions] = f"building its index at {dimensions} dimensions failed: {error!r}"
                    self._condition.notify_all()
                continue
            with self._condition:
                self._ready = {**self._ready, dimensions: index}
                self._condition.notify_all()

    def _built(self, dimensions: int, rows: int, current: VectorIndex | None) -> VectorIndex:
        """`current` extended to `rows` rows, or a new index of them (loaded from its file if saved)."""
        stored = self.stored(rows)
        if current is not None:
            return self._extended(current, stored, dimensions, in_place=False)
        if self.kind is IndexKind.FLAT:
            device, dtype = (
                (self.search_device, _TORCH_DTYPES[self.dtype.str]) if self.flat_on_device else ("cpu", torch.float32)
            )
            return self._extended(TorchFlat.empty(dimensions, device, dtype, capacity=rows), stored, dimensions)
        started = time.perf_counter()
        saved = self._load_saved(dimensions, rows)
        if saved is not None:
            self._saved_rows[dimensions] = saved.indexed_rows
            return self._extended(saved, stored, dimensions, in_place=True)
        index = self._extended(self._new_approximate(dimensions, stored), stored, dimensions, in_place=True)
        log.info("collection %r: built its %s index at %d dimensions over %d rows in %.1f s", self.name,
                 self.kind.value, dimensions, index.rows, time.perf_counter() - started)  # fmt: skip
        self._save(dimensions, index)
        return index

    def _extended(
        self, index: VectorIndex, stored: np.ndarray, dimensions: int, *, in_place: bool = True
    ) -> VectorIndex:
        for start in range(index.rows, len(stored), BUILD_CHUNK_ROWS):
            if self._closing:
                raise _Closing
            block = prefix_normalised(stored[start : start + BUILD_CHUNK_ROWS], dimensions)
            if isinstance(index, TorchFlat):
                index = index.extended(block)
            else:
                extended = index.extended(block, in_place=in_place)
                in_place = in_place or extended.index is not index.index  # copied: no reader has the copy
                index = extended
        return index

    def _new_approximate(self, dimensions: int, stored: np.ndarray) -> Approximate:
        if self.kind is IndexKind.HNSW:
            hnsw = faiss.IndexHNSWFlat(dimensions, 32, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 80
            hnsw.hnsw.efSearch = 128
            return Approximate(hnsw)
        # IVF-Flat with sqrt(n) lists and nprobe = lists / 16: a recall-first setting, measured in bench/search.py.
        lists = max(16, int(np.sqrt(len(stored))))
        sample = len(stored) if len(stored) <= IVF_TRAINING_SAMPLE * lists else IVF_TRAINING_SAMPLE * lists
        rows = np.sort(np.random.default_rng(0).choice(len(stored), size=sample, replace=False))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimensions), dimensions, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.train(prefix_normalised(stored[rows], dimensions))
        ivf.nprobe = max(1, lists // 16)
        return Approximate(ivf)

    # -- saved files -------------------------------------------------------------------------------

    def _saved_path(self, dimensions: int) -> Path:
        return self.folder / f"{self.kind.value}-{dimensions}.faiss"

    def _load_saved(self, dimensions: int, rows: int) -> Approximate | None:
        path = self._saved_path(dimensions)
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:  # a torn or corrupt file: FAISS checks every read
            log.warning("collection %r: its saved index %s cannot be read (%s); rebuilding it from the vectors",
                        self.name, path.name, str(error).splitlines()[0])  # fmt: skip
            return None
        expected = faiss.IndexHNSW if self.kind is IndexKind.HNSW else faiss.IndexIVFFlat
        if not isinstance(index, expected) or index.d != dimensions or index.ntotal > rows:
            # ntotal > rows: it covers rows cut off on open as uncommitted
            log.warning("collection %r: its saved index %s does not fit the collection (%s, %d-d, %d rows of %d); "
                        "rebuilding it from the vectors", self.name, path.name, type(index).__name__, index.d,
                        index.ntotal, rows)  # fmt: skip
            return None
        return Approximate(index)

    def _save(self, dimensions: int, index: Approximate) -> None:
        """write, fsync, rename, fsync the folder: a crash leaves the old file or the new one, whole."""
        path = self._saved_path(dimensions)
        temporary = path.with_suffix(".tmp")
        try:
            faiss.write_index(index.index, str(temporary))
            with temporary.open("rb") as file:
                os.fsync(file.fileno())
            os.replace(temporary, path)
            fsync_directory(self.folder)
        except (OSError, RuntimeError):  # a derived file: without it the index is rebuilt on open
            log.exception("collection %r: could not save its index at %d dimensions", self.name, dimensions)
            return
        self._saved_rows[dimensions] = index.indexed_rows


_TORCH_DTYPES = {"<f2": torch.float16, "<f4": torch.float32}


def _mask(allowed: np.ndarray | None, covered: int, index_rows: int) -> np.ndarray | None:
    """`allowed` for an index of `index_rows` rows, of which a reader sees the first `covered`."""
    if allowed is None and covered == index_rows:
        return None
    mask = np.zeros(index_rows, dtype=bool)
    mask[:covered] = True if allowed is None else allowed[:covered]
    return mask


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
