"""Retrieval quality of a collection on a BEIR dataset, measured through a running server.

Metrics come from pytrec_eval (trec_eval), as MTEB computes them: nDCG@10, Recall@10, Recall@100,
averaged over the split's queries that have at least one relevant document.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Mapping
from pathlib import Path

MEASURES = {"ndcg_cut.10", "recall.10", "recall.100"}
TOP_K = 100


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def read_queries(path: Path) -> dict[str, str]:
    with path.open() as lines:
        return {record["_id"]: record["text"] for record in map(json.loads, lines) if record}


def score(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean nDCG@10, Recall@10 and Recall@100 over the judged queries, with trec_eval's definitions."""
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(dict(qrels), MEASURES).evaluate(dict(run))
    count = len(per_query)
    return {
        "ndcg@10": sum(q["ndcg_cut_10"] for q in per_query.values()) / count,
        "recall@10": sum(q["recall_10"] for q in per_query.values()) / count,
        "recall@100": sum(q["recall_100"] for q in per_query.values()) / count,
        "queries": count,
    }


def evaluate_beir(args: argparse.Namespace) -> dict[str, float]:
    from tqdm import tqdm

    from scholarembed import Client

    qrels = read_qrels(args.beir / "qrels" / f"{args.split}.tsv")
    queries = read_queries(args.beir / "queries.jsonl")
    query_ids = sorted(qid for qid in qrels if qid in queries)
    run: dict[str, dict[str, float]] = {}
    with Client(args.server, timeout=None) as client:
        results = client.search_stream(
            (queries[qid] for qid in query_ids),
            collection=args.collection,
            top_k=TOP_K,
            dimensions=args.dimensions,
            mode=args.mode,
        )
        for qid, hits in tqdm(zip(query_ids, results, strict=True), total=len(query_ids), disable=args.no_progress):
            run[qid] = {hit.id: hit.score for hit in hits}
    return score({qid: qrels[qid] for qid in query_ids}, run)
