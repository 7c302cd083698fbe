"""Vector search in the embedded store: exact vs approximate, at full and Matryoshka dimensions.

    python -m bench.search --sizes 100000,1000000

For each size it writes synthetic unit vectors (768-d, clustered like real embeddings: 2,000
Gaussian clusters plus noise) into a real collection on disk, through the store's own upsert path,
then measures:
  - opening the collection (the constructor) and building the first index at a dimension;
  - exact (flat) search: latency of one query, and QPS for batches of 64 queries, at 768 and 256 dims;
  - HNSW and IVF: build time, QPS, recall@10 against the exact results, speed-up over exact.
Queries are fresh points from the same clusters. Only ratios from one run mean anything.

    python -m bench.search --sizes 100000 --modes --kinds ""

--modes measures the search modes instead, on one flat collection whose passages also have text:
170 words each (an abstract's length) drawn from a 30,000-word Zipf vocabulary, queries of 4 to 15
such words. Per mode, the store's part of a search (the query embedding is the same in dense and
hybrid, and left out): median latency of one query (10 of them), and queries/s of 16 in one call. Hybrid is the
two lists of depth 100 and the Searcher's own fusion. It also times what a collection from before
lexical search costs on its first open: building the FTS5 index of its passages.
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scholarembed_server.index.base import IndexKind, StoredPassage, VectorStorage
from scholarembed_server.index.embedded import EmbeddedIndex
from scholarembed_server.searcher import DEFAULT_HYBRID_DEPTH, DEFAULT_RRF_K, reciprocal_rank_fusion

REPO = Path(__file__).resolve().parent.parent
DIMENSIONS = 768
CLUSTERS = 2000


def synthetic(rng: np.random.Generator, centers: np.ndarray, count: int) -> np.ndarray:
    points = centers[rng.integers(0, len(centers), count)] + 0.6 * rng.standard_normal((count, DIMENSIONS)) / np.sqrt(
        DIMENSIONS
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def fill(index: EmbeddedIndex, name: str, kind: IndexKind, size: int, centers: np.ndarray) -> float:
    index.create_collection(
        name, dimensions=DIMENSIONS, model="synthetic", index_kind=kind, vector_storage=VectorStorage.FLOAT16
    )
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
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, DIMENSIONS)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
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
        index.search("flat", q[:1], 10)
        report[f"flat_first_search_s_{dims}"] = time.perf_counter() - started  # includes building the index
        single = [timed_search(index, "flat", q[i : i + 1])[1] for i in range(20)]
        exact[dims], batch_s = timed_search(index, "flat", q)
        report[f"flat_latency_ms_{dims}"] = 1000 * float(np.median(single))
        report[f"flat_qps_{dims}"] = len(q) / batch_s
    for kind in kinds:
        started = time.perf_counter()
        fill(index, kind.value, kind, size, centers)
        q = queries
        index.search(kind.value, q[:1], 10)  # builds the index
        report[f"{kind.value}_build_s"] = time.perf_counter() - started
        ids, batch_s = timed_search(index, kind.value, q)
        report[f"{kind.value}_qps_768"] = len(q) / batch_s
        report[f"{kind.value}_recall@10_768"] = recall(ids, exact[768])
        report[f"{kind.value}_speedup_768"] = report[f"{kind.value}_qps_768"] / report["flat_qps_768"]  # type: ignore[operator]
    index.close()
    return report


def synthetic_texts(
    rng: np.random.Generator, count: int, words: tuple[int, int], vocabulary: int = 30_000
) -> list[str]:
    """Texts of Zipf-distributed words (w0, w1, ...), as natural text's word frequencies are."""
    ranks = np.minimum(rng.zipf(1.1, size=(count, words[1])), vocabulary) - 1
    lengths = rng.integers(words[0], words[1] + 1, size=count)
    return [" ".join(f"w{r}" for r in row[:length]) for row, length in zip(ranks, lengths, strict=True)]


def run_modes(size: int, folder: Path) -> dict[str, object]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, DIMENSIONS)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    report: dict[str, object] = {"size": size}
    index = EmbeddedIndex(folder)
    index.create_collection(
        "modes", dimensions=DIMENSIONS, model="synthetic", index_kind=IndexKind.FLAT,
        vector_storage=VectorStorage.FLOAT16,
    )  # fmt: skip
    started, started_cpu = time.perf_counter(), time.process_time()
    for start in range(0, size, 20_000):
        count = min(20_000, size - start)
        texts = synthetic_texts(rng, count, (120, 220))
        passages = [StoredPassage(f"p{start + i}", "", text) for i, text in enumerate(texts)]
        index.upsert("modes", passages, synthetic(rng, centers, count))
    report["ingest_with_lexical_s"] = time.perf_counter() - started
    report["ingest_with_lexical_cpu_s"] = time.process_time() - started_cpu
    query_vectors = synthetic(np.random.default_rng(1), centers, 16)
    query_texts = synthetic_texts(np.random.default_rng(2), 16, (4, 15))
    index.search("modes", query_vectors[:1], 10)  # builds the flat index

    def dense(first: int, last: int) -> list:
        return index.search("modes", query_vectors[first:last], DEFAULT_HYBRID_DEPTH)

    def lexical(first: int, last: int) -> list:
        return index.lexical_search("modes", query_texts[first:last], DEFAULT_HYBRID_DEPTH)

    def hybrid(first: int, last: int) -> list:
        lists = zip(dense(first, last), lexical(first, last), strict=True)
        return [reciprocal_rank_fusion({"dense": d, "lexical": x}, DEFAULT_RRF_K, 10) for d, x in lists]

    for mode, search in (("dense", dense), ("lexical", lexical), ("hybrid", hybrid)):
        single, single_cpu = [], []
        for i in range(10):
            started, started_cpu = time.perf_counter(), time.process_time()
            search(i, i + 1)
            single.append(time.perf_counter() - started)
            single_cpu.append(time.process_time() - started_cpu)
        started = time.perf_counter()
        search(0, 16)
        report[f"{mode}_latency_ms"] = 1000 * float(np.median(single))
        # CPU time of this process (all its threads): what a loaded, shared machine does not inflate.
        report[f"{mode}_cpu_ms"] = 1000 * float(np.median(single_cpu))
        report[f"{mode}_qps"] = 16 / (time.perf_counter() - started)
    index.close()

    # A collection from before lexical search: its passages are indexed on the first open.
    import sqlite3

    db = sqlite3.connect(folder / "modes" / "collection.sqlite")
    db.executescript("DROP TRIGGER passages_fts_insert; DROP TRIGGER passages_fts_delete; DROP TABLE passages_fts;")
    db.close()
    started, started_cpu = time.perf_counter(), time.process_time()
    EmbeddedIndex(folder).close()
    report["open_building_lexical_index_s"] = time.perf_counter() - started
    report["open_building_lexical_index_cpu_s"] = time.process_time() - started_cpu
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000", help="comma-separated collection sizes")
    parser.add_argument("--kinds", default="ivf,hnsw", help="approximate index kinds to compare with exact")
    parser.add_argument("--modes", action="store_true", help="measure dense, lexical and hybrid search instead")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    kinds = [IndexKind(k) for k in args.kinds.split(",") if k]
    reports = []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-search-{size}-", dir=os.environ.get("BENCH_TMP")))
        try:
            print(f"size {size}: building ...", file=sys.stderr)
            report = run_modes(size, folder) if args.modes else run_size(size, kinds, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        reports.append(report)
        for key, value in report.items():
            print(f"  {key:28} {value:12.4f}" if isinstance(value, float) else f"  {key:28} {value:>12}")
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
