"""Search in the embedded store: vector indexes, and the three search modes against FTS5.

    python -m bench.search --sizes 100000,1000000

For each size it writes synthetic unit vectors (768-d, clustered like real embeddings: 2,000
Gaussian clusters plus noise) into a real collection on disk, through the store's own upsert path,
then measures:
  - opening the collection (the constructor) and building the flat index at a dimension;
  - exact (flat) search: latency of one query, and QPS for batches of 64 queries, at 768 and 256 dims;
  - HNSW and IVF: build time, QPS, recall@10 against the exact results, speed-up over exact.
Queries are fresh points from the same clusters. Only ratios from one run mean anything.

    python -m bench.search --modes --sizes 10000,100000,1000000

--modes measures the search modes instead (issue 19's targets), the query embedding left out. Each
passage has 120 to 220 words (an abstract's length) drawn from a 30,000-word Zipf vocabulary; queries
have 4 to 15 such words. At each size, in one run:
  - the baseline: the previous release's collection, SQLite FTS5 as its lexical index, written and
    searched as that release did (`Fts5Collection`, kept here only): ingest time and search latency;
  - the store: ingest time (vectors, SQLite and the tantivy catch-up), then, with the dense index
    built (--dense-kind, IVF by default: exact search at 1M takes hundreds of ms a query), the median
    latency of one query (--latency-queries of them) in dense, lexical and hybrid mode (hybrid: both
    lists of depth 100 at once, in two threads as the Searcher runs them, and its own fusion), and
    queries/s with 16 concurrent callers, each calling the store;
  - ingest of small upserts (64 passages each, as a client streams them) into both;
  - the migration: opening the baseline's folder with the store, which moves it to tantivy.
Latency is wall time, and CPU time of this process (which a busy machine inflates less).
Prints a table and writes JSON to bench/results/ (`runs`, one per size: what the docs plot against size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from scholarembed_server.config import ServerConfig
from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.searcher import DEFAULT_HYBRID_DEPTH, DEFAULT_RRF_K, reciprocal_rank_fusion

REPO = Path(__file__).resolve().parent.parent
DIMENSIONS = 768
CLUSTERS = 2000
BATCH = 20_000  # passages a bulk upsert
SMALL_BATCH = 64  # passages an upsert of a client's stream (the client's default batch)
STREAM_WINDOW = ServerConfig.stream_window  # requests of one stream the server answers at once
CALLERS = 16


def synthetic(rng: np.random.Generator, centers: np.ndarray, count: int) -> np.ndarray:
    points = centers[rng.integers(0, len(centers), count)] + 0.6 * rng.standard_normal((count, DIMENSIONS)) / np.sqrt(
        DIMENSIONS
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def cluster_centers() -> np.ndarray:
    centers = np.random.default_rng(0).standard_normal((CLUSTERS, DIMENSIONS)).astype(np.float32)
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def create(index: EmbeddedIndex, name: str, kind: IndexKind) -> None:
    index.create_collection(
        name, dimensions=DIMENSIONS, model="synthetic", index_kind=kind, vector_storage=VectorStorage.FLOAT16
    )


# -- vector indexes ------------------------------------------------------------------------------------------


def fill(index: EmbeddedIndex, name: str, kind: IndexKind, size: int, centers: np.ndarray) -> float:
    create(index, name, kind)
    rng = np.random.default_rng(7)  # the same corpus for every kind
    started = time.perf_counter()
    for start in range(0, size, 50_000):
        count = min(50_000, size - start)
        passages = [StoredPassage(f"p{start + i}", "", "x") for i in range(count)]
        index.upsert(name, passages, synthetic(rng, centers, count))
    return time.perf_counter() - started


def timed_search(index: EmbeddedIndex, name: str, queries: np.ndarray, k: int = 10) -> tuple[list[list[str]], float]:
    started = time.perf_counter()
    hits = index.search(name, queries, k)
    return [[h.id for h in q] for q in hits], time.perf_counter() - started


def recall(approximate: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approximate, exact, strict=True)]))


def run_size(size: int, kinds: list[IndexKind], folder: Path) -> dict[str, object]:
    centers = cluster_centers()
    queries = synthetic(np.random.default_rng(1), centers, 256)
    report: dict[str, object] = {"size": size}

    index = EmbeddedIndex(folder)
    report["ingest_s"] = fill(index, "flat", IndexKind.FLAT, size, centers)
    index.close()
    started = time.perf_counter()
    index = EmbeddedIndex(folder)
    report["open_s"] = time.perf_counter() - started
    exact: dict[int, list[list[str]]] = {}
    for dims in (768, 256):
        q = queries[:, :dims] / np.linalg.norm(queries[:, :dims], axis=1, keepdims=True)
        started = time.perf_counter()
        index.wait_until_indexed("flat", [dims])
        report[f"flat_build_s_{dims}"] = time.perf_counter() - started
        single = [timed_search(index, "flat", q[i : i + 1])[1] for i in range(20)]
        exact[dims], batch_s = timed_search(index, "flat", q)
        report[f"flat_latency_ms_{dims}"] = 1000 * float(np.median(single))
        report[f"flat_qps_{dims}"] = len(q) / batch_s
    for kind in kinds:
        fill(index, kind.value, kind, size, centers)
        started = time.perf_counter()
        index.wait_until_indexed(kind.value, [768])
        report[f"{kind.value}_build_s"] = time.perf_counter() - started
        ids, batch_s = timed_search(index, kind.value, queries)
        report[f"{kind.value}_qps_768"] = len(queries) / batch_s
        report[f"{kind.value}_recall@10_768"] = recall(ids, exact[768])
        report[f"{kind.value}_speedup_768"] = report[f"{kind.value}_qps_768"] / report["flat_qps_768"]  # type: ignore[operator]
    index.close()
    return report


# -- search modes ------------------------------------------------------------------------------------------


class Fts5Collection:
    """A collection as the previous release wrote and searched it (SQLite FTS5 as its lexical index), kept
    here as the baseline: its write path (vectors.bin appended and fsynced, then one SQLite transaction
    whose triggers fill the FTS5 index) and its lexical query (the query's words, each quoted, OR'ed,
    ranked by bm25()), under one lock as that store held it. Its folder is what the migration starts from.
    """

    SCHEMA = """
        PRAGMA journal_mode=WAL;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE passages (
            row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
            text TEXT NOT NULL, metadata TEXT NOT NULL
        );
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
    QUERY = (
        "SELECT passages.id, bm25(passages_fts) AS bm25 FROM passages_fts "
        "JOIN passages ON passages.row = passages_fts.rowid WHERE passages_fts MATCH ? "
        "ORDER BY bm25, passages.id LIMIT ?"
    )

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.vectors_path = folder / "vectors.bin"
        self.vectors_path.touch()
        self.rows = 0
        self.lock = threading.Lock()
        self.db = sqlite3.connect(folder / "collection.sqlite", check_same_thread=False, isolation_level=None)
        self.db.executescript(self.SCHEMA)
        self.db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("dimensions", str(DIMENSIONS)), ("model", "synthetic"), ("index_kind", "flat"),
             ("vector_storage", "float16"), ("vector_rows", "0")],
        )  # fmt: skip
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE VIRTUAL TABLE temp.query_words USING fts5(query, tokenize='unicode61 remove_diacritics 2')"
        )
        self.db.execute("CREATE VIRTUAL TABLE temp.query_vocabulary USING fts5vocab(temp, query_words, row)")

    def upsert(self, passages: Sequence[StoredPassage], vectors: np.ndarray) -> None:
        with self.lock:
            with self.vectors_path.open("r+b") as file:
                file.seek(self.rows * DIMENSIONS * 2)
                file.write(np.ascontiguousarray(vectors, dtype="<f2").tobytes())
                file.flush()
                os.fsync(file.fileno())
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM passages WHERE id = ?", [(p.id,) for p in passages])
            self.db.executemany(
                "INSERT INTO passages (row, id, title, text, metadata) VALUES (?, ?, ?, ?, '{}')",
                [(self.rows + i, p.id, p.title, p.text) for i, p in enumerate(passages)],
            )
            self.rows += len(passages)
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'vector_rows'", (str(self.rows),))
            self.db.execute("COMMIT")

    def search(self, query: str, k: int) -> list[str]:
        with self.lock:
            self.db.execute("DELETE FROM temp.query_words")
            self.db.execute("INSERT INTO temp.query_words VALUES (?)", (query,))
            words = [word for (word,) in self.db.execute("SELECT term FROM temp.query_vocabulary")]
            expression = " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
            return [id_ for id_, _ in self.db.execute(self.QUERY, (expression, k))]

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


def synthetic_texts(
    rng: np.random.Generator, count: int, words: tuple[int, int], vocabulary: int = 30_000
) -> list[str]:
    """Texts of Zipf-distributed words (w0, w1, ...), as natural text's word frequencies are."""
    ranks = np.minimum(rng.zipf(1.1, size=(count, words[1])), vocabulary) - 1
    lengths = rng.integers(words[0], words[1] + 1, size=count)
    return [" ".join(f"w{r}" for r in row[:length]) for row, length in zip(ranks, lengths, strict=True)]


def corpus(size: int, batch: int, first: int = 0) -> Iterator[tuple[list[StoredPassage], np.ndarray]]:
    """(passages, vectors) batches of a synthetic corpus, made as they are needed: the same every time."""
    centers = cluster_centers()
    for start in range(first, first + size, batch):
        rng = np.random.default_rng(start)
        count = min(batch, first + size - start)
        texts = synthetic_texts(rng, count, (120, 220))
        yield [StoredPassage(f"p{start + i}", "", text) for i, text in enumerate(texts)], synthetic(rng, centers, count)


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    started, started_cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - started, time.process_time() - started_cpu


def ingest(upsert: Callable[[list[StoredPassage], np.ndarray], object], batches: Iterable) -> float:
    """Seconds spent in `upsert` (making the synthetic batches is left out)."""
    spent = 0.0
    for passages, vectors in batches:
        spent += timed(lambda p=passages, v=vectors: upsert(p, v))[0]
    return spent


def pipelined_ingest(index: EmbeddedIndex, name: str, batches: Iterable) -> None:
    """Commit each batch in order and wait for it to be searchable in other threads, STREAM_WINDOW writes at a
    time, as the server answers one UpsertPassages stream."""
    with ThreadPoolExecutor(STREAM_WINDOW) as waiting:
        in_flight: deque[Future[None]] = deque()
        for passages, vectors in batches:
            in_flight.append(waiting.submit(index.commit_upsert(name, passages, vectors).wait_searchable))
            if len(in_flight) == STREAM_WINDOW:
                in_flight.popleft().result()
        for pending in in_flight:
            pending.result()


def latencies(report: dict[str, object], mode: str, search: Callable[[int], object], queries: int) -> None:
    times = [timed(lambda i=i: search(i)) for i in range(queries)]
    report[f"{mode}_latency_ms"] = 1000 * float(np.median([wall for wall, _ in times]))
    report[f"{mode}_cpu_ms"] = 1000 * float(np.median([cpu for _, cpu in times]))


def throughput(report: dict[str, object], mode: str, search: Callable[[int], object], rounds: int) -> None:
    """Queries/s of CALLERS threads, each calling `search` `rounds` times."""

    def caller(number: int) -> None:
        for round_ in range(rounds):
            search((number + round_) % CALLERS)

    with ThreadPoolExecutor(CALLERS) as pool:
        started = time.perf_counter()
        list(pool.map(caller, range(CALLERS)))
        report[f"{mode}_qps_{CALLERS}_callers"] = CALLERS * rounds / (time.perf_counter() - started)


def run_modes(size: int, folder: Path, dense_kind: IndexKind, latency_queries: int) -> dict[str, object]:
    report: dict[str, object] = {"size": size, "dense_kind": dense_kind.value}
    query_vectors = synthetic(np.random.default_rng(1), cluster_centers(), CALLERS)
    query_texts = synthetic_texts(np.random.default_rng(2), CALLERS, (4, 15))

    print(f"size {size}: FTS5 baseline ...", file=sys.stderr)
    baseline = Fts5Collection(folder / "fts5" / "modes")
    report["fts5_ingest_s"] = ingest(baseline.upsert, corpus(size, BATCH))
    latencies(report, "fts5", lambda i: baseline.search(query_texts[i % CALLERS], DEFAULT_HYBRID_DEPTH), 5)
    throughput(report, "fts5", lambda i: baseline.search(query_texts[i], DEFAULT_HYBRID_DEPTH), 1)
    fts5_top = [baseline.search(text, 10) for text in query_texts]

    print(f"size {size}: the store ...", file=sys.stderr)
    index = EmbeddedIndex(folder / "store")
    create(index, "modes", dense_kind)
    report["ingest_s"] = ingest(lambda p, v: index.upsert("modes", p, v), corpus(size, BATCH))
    report["dense_index_build_s"] = timed(lambda: index.wait_until_indexed("modes", [DIMENSIONS]))[0]
    lists = ThreadPoolExecutor(2)  # the Searcher's two read threads

    def dense(i: int) -> list:
        return index.search("modes", query_vectors[i % CALLERS : i % CALLERS + 1], DEFAULT_HYBRID_DEPTH)

    def lexical(i: int) -> list:
        return index.lexical_search("modes", [query_texts[i % CALLERS]], DEFAULT_HYBRID_DEPTH)

    def hybrid(i: int) -> list:
        both = lists.submit(dense, i), lists.submit(lexical, i)
        return reciprocal_rank_fusion({"dense": both[0].result()[0], "lexical": both[1].result()[0]}, DEFAULT_RRF_K, 10)

    def hybrid_in_caller(i: int) -> list:
        return reciprocal_rank_fusion({"dense": dense(i)[0], "lexical": lexical(i)[0]}, DEFAULT_RRF_K, 10)

    for mode, search in (("dense", dense), ("lexical", lexical), ("hybrid", hybrid)):
        latencies(report, mode, search, latency_queries)
    for mode, search in (("dense", dense), ("lexical", lexical), ("hybrid", hybrid_in_caller)):
        throughput(report, mode, search, rounds=max(1, latency_queries // 2))
    lists.shutdown()
    report["lexical_speedup_vs_fts5"] = report["fts5_latency_ms"] / report["lexical_latency_ms"]  # type: ignore[operator]
    tantivy_top = [[h.id for h in index.lexical_search("modes", [text], 10)[0]] for text in query_texts]
    report["top10_overlap_with_fts5"] = float(
        np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(tantivy_top, fts5_top, strict=True)])
    )

    small = 100 * SMALL_BATCH
    create(index, "small", IndexKind.FLAT)
    spent = ingest(lambda p, v: index.upsert("small", p, v), corpus(small, SMALL_BATCH, first=size))
    report["small_upserts_passages_per_s"] = small / spent
    # As an UpsertPassages stream writes them (grpc/search.py): committed one after another, each waiting to
    # become searchable in a thread of its own, STREAM_WINDOW at a time, so catch-ups serve several writes.
    create(index, "pipelined", IndexKind.FLAT)
    report["small_upserts_pipelined_passages_per_s"] = (
        small / timed(lambda: pipelined_ingest(index, "pipelined", corpus(small, SMALL_BATCH, first=size)))[0]
    )
    index.close()
    baseline_small = Fts5Collection(folder / "fts5-small" / "small")
    report["fts5_small_upserts_passages_per_s"] = small / ingest(
        baseline_small.upsert, corpus(small, SMALL_BATCH, first=size)
    )
    baseline_small.close()
    shutil.rmtree(folder / "fts5-small")

    print(f"size {size}: migrating the FTS5 collection ...", file=sys.stderr)
    baseline.close()
    opened: list[EmbeddedIndex] = []
    report["migration_s"], report["migration_cpu_s"] = timed(lambda: opened.append(EmbeddedIndex(folder / "fts5")))
    migrated = opened[0]
    migrated_top = [[h.id for h in migrated.lexical_search("modes", [text], 10)[0]] for text in query_texts]
    migrated.close()
    report["migrated_top10_overlap"] = float(
        np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(migrated_top, tantivy_top, strict=True)])
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated collection sizes")
    parser.add_argument("--kinds", default="ivf,hnsw", help="approximate index kinds to compare with exact")
    parser.add_argument("--modes", action="store_true", help="measure dense, lexical and hybrid search against FTS5")
    parser.add_argument("--dense-kind", default="ivf", help="--modes: the dense index of the collection")
    parser.add_argument("--latency-queries", type=int, default=20, help="--modes: queries per median latency")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the store's progress lines
    kinds = [IndexKind(k) for k in args.kinds.split(",") if k]
    reports = []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-search-{size}-", dir=os.environ.get("BENCH_TMP")))
        try:
            print(f"size {size}: building ...", file=sys.stderr)
            if args.modes:
                report = run_modes(size, folder, IndexKind(args.dense_kind), args.latency_queries)
            else:
                report = run_size(size, kinds, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        reports.append(report)
        for key, value in report.items():
            print(f"  {key:34} {value:12.4f}" if isinstance(value, float) else f"  {key:34} {value!s:>12}")
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"search-{'modes-' if args.modes else ''}cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "runs": reports}
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    if args.modes:  # search latency against collection size, for each mode
        from bench import plots  # matplotlib, only once there is something to draw

        plots.save(report, path)


if __name__ == "__main__":
    main()
