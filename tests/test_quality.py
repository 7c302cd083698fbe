"""Retrieval quality through the server, with the real all-MiniLM-L6-v2, on a fixed SciFact subset,
in every search mode over the same server and collection.

The expected values were computed independently by tests/scifact_subset.py (sentence-transformers'
encode and numpy exact search; bm25s, a BM25 that is not the server's; its own reciprocal-rank fusion;
pytrec_eval) and frozen here. The full test split (`make eval`) must reproduce MTEB's published
0.64508 / 0.78333 / 0.92500 in dense mode.

Dense is compared at 5e-4: the same model and exact search on both sides. Lexical and hybrid allow for
two BM25s that tokenise and score differently (tantivy keeps document lengths in 256 lossy buckets, as
Lucene does, bm25s exactly, which reorders near ties). Measured on the full test split (300 queries),
they differ on 9 queries in nDCG@10 (by 0.031 at the median, 0.301 at most), on 2 in recall@10 and on 1
in recall@100; on this subset, on one query, in nDCG@10 by 0.369, which moves the mean by 0.0074. The
tolerance is 0.01 on nDCG@10 (one query differing by half its range, or several by the median
amount) and 0.02 on recall (one relevant abstract crossing a cut-off in one query: recall moves in
steps of 1/50 here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ServerProcess
from scifact_subset import SCIFACT, write_subset

FROZEN = {  # 50 queries, 1,041 abstracts
    "dense": {"ndcg@10": 0.8464790300758546, "recall@10": 0.92, "recall@100": 1.0},
    "lexical": {"ndcg@10": 0.8618458732854726, "recall@10": 0.9359999999999999, "recall@100": 0.98},
    "hybrid": {"ndcg@10": 0.9114046936767535, "recall@10": 0.98, "recall@100": 1.0},
}
TOLERANCE = {
    "dense": {"ndcg@10": 5e-4, "recall@10": 5e-4, "recall@100": 5e-4},
    "lexical": {"ndcg@10": 0.01, "recall@10": 0.02, "recall@100": 0.02},
    "hybrid": {"ndcg@10": 0.01, "recall@10": 0.02, "recall@100": 0.02},
}


def test_scifact_subset_through_the_server_matches_the_reference(tmp_path, minilm_dir) -> None:
    assert SCIFACT.exists(), f"SciFact (BEIR format) is needed at {SCIFACT}; set SCIFACT_DIR to its folder"
    subset = write_subset(tmp_path / "scifact")
    server = ServerProcess(tmp_path, "--model", str(minilm_dir), "--data-dir", str(tmp_path / "data"))
    try:
        cli = [sys.executable, "-m", "scholarembed_server"]
        common = ["--collection", "scifact", "--server", server.address, "--no-progress"]
        subprocess.run([*cli, "index", "--corpus", str(subset / "corpus.jsonl"), *common], check=True, timeout=600)
        results = {}
        for mode in FROZEN:
            results[mode] = subprocess.run(
                [*cli, "eval", "--beir", str(subset), "--split", "test", "--mode", mode, *common],
                check=True, timeout=600, capture_output=True, text=True,
            )  # fmt: skip
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{error}\n{error.stderr or ''}\nserver log:\n{server.output()}")
    finally:
        server.stop()
    for mode, expected_metrics in FROZEN.items():
        metrics = json.loads(results[mode].stdout)
        assert metrics["queries"] == 50
        for name, expected in expected_metrics.items():
            assert metrics[name] == pytest.approx(expected, abs=TOLERANCE[mode][name]), (mode, name)
