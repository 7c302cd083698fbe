"""`scholarembed` command line: serve, compile (ahead, for replicas), embed (bulk, through a server or
in-process), load, info, index, search, eval.

torch and transformers are imported only by the commands that need them, so `scholarembed embed
--server ...` and `scholarembed info` work with the light client install.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .config import DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, add_arguments, from_arguments, missing_extra

StreamItem = str | tuple[str, str]
DEFAULT_SERVER = "127.0.0.1:50051"  # where the client commands look for a server; serve's default address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scholarembed",
        description="Scholarly text embeddings: serve the model (gRPC, HTTP, a search page, a passage store), "
        "and the commands that use a server: index, search, eval, embed, info.",
        epilog="Start with `scholarembed serve`, then `scholarembed index --corpus FILE --collection NAME`. "
        "Each command has --help.",
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve the model: gRPC, the HTTP door and search page, metrics, the embedded passage store",
        description=f"Serve the model. With no flag: gRPC on {DEFAULT_SERVER}, HTTP (the search page, OpenAI "
        f"/v1/embeddings, /v1/search) on {DEFAULT_HTTP_PORT}, Prometheus metrics on {DEFAULT_METRICS_PORT}, and "
        "the embedded passage store in "
        "$XDG_DATA_HOME/scholarembed (~/.local/share/scholarembed). --no-http, --no-metrics and --no-index turn "
        "parts off.",
    )
    add_arguments(serve)

    compile_ahead = commands.add_parser(
        "compile", help="compile the bucket shapes ahead into a folder that serve loads (--compile-artifacts)"
    )
    add_arguments(compile_ahead)  # serve's flags: the shapes compiled are the ones serve will run
    compile_ahead.add_argument("--output", required=True, type=Path, help="folder for the compile artifacts")

    embed = commands.add_parser("embed", help="bulk-encode a JSONL or text file into a .npy matrix")
    embed.add_argument(
        "--input",
        required=True,
        help="JSONL (text/title fields) or plain text, one text per line; with --engine ray: JSONL or Parquet "
        "files, a folder of them, or a pyarrow URI (s3://...)",
    )
    embed.add_argument(
        "--output", required=True, help="output .npy file, (n, dimensions) float32; with --engine ray: a folder or URI"
    )
    embed.add_argument("--type", default="passage", choices=["query", "passage", "raw"], help="input type")
    embed.add_argument("--dimensions", type=int, default=0, help="Matryoshka dimension; 0 = full size")
    embed.add_argument("--text-field", default="text", help="JSONL field holding the text")
    embed.add_argument("--title-field", default="title", help="JSONL field holding the title (passages)")
    embed.add_argument("--batch-size", type=int, default=64, help="texts per request")
    source = embed.add_mutually_exclusive_group()
    source.add_argument("--server", default=DEFAULT_SERVER, help="server address (default)")
    source.add_argument("--model", help="run in-process with this model (hub id or folder) instead of a server")
    embed.add_argument("--device", default="auto", help="with --model: auto, cpu or cuda")
    embed.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from .ray.cli import add_embed_arguments, add_load_command

    add_embed_arguments(embed)
    add_load_command(commands)

    info = commands.add_parser("info", help="print the model info of a running server")
    info.add_argument("--server", default=DEFAULT_SERVER)

    index = commands.add_parser("index", help="stream a BEIR-style JSONL corpus into a collection (resumable)")
    index.add_argument("--corpus", required=True, type=Path, help="JSONL with _id (or id), title, text, metadata")
    index.add_argument("--collection", required=True)
    index.add_argument("--server", default=DEFAULT_SERVER)
    index.add_argument("--batch-size", type=int, default=64, help="passages per upsert request")
    index.add_argument("--index-kind", choices=["flat", "hnsw", "ivf"], help="for a new collection")
    index.add_argument("--no-progress", action="store_true")

    search = commands.add_parser("search", help="search a collection and print a table")
    search.add_argument("query")
    search.add_argument("--collection", required=True)
    search.add_argument("--server", default=DEFAULT_SERVER)
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--dimensions", type=int, default=0)
    search.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="dense", help="ranking (dense)")

    evaluate = commands.add_parser("eval", help="nDCG@10, Recall@10, Recall@100 of a BEIR dataset, via the server")
    evaluate.add_argument("--beir", required=True, type=Path, help="folder with queries.jsonl and qrels/<split>.tsv")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--collection", required=True)
    evaluate.add_argument("--server", default=DEFAULT_SERVER)
    evaluate.add_argument("--dimensions", type=int, default=0)
    evaluate.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="dense", help="ranking (dense)")
    evaluate.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import logs

    logs.configure(args.log_level, getattr(args, "log_format", "text"))
    if args.command in ("serve", "compile"):
        config = from_arguments(args)
        if args.command == "compile":  # compiles the model's shapes: it opens no door and no store
            config = dataclasses.replace(config, http_port=None, metrics_port=None, data_dir=None, index_uri=None)
        # Before torch, the model or a door is imported: a missing package is named with its fix at once.
        missing = missing_extra(config)
        if missing:
            print(f"scholarembed {args.command}: error: {missing}", file=sys.stderr)
            return 1
        from .errors import ScholarEmbedError

        try:
            return serve_or_compile(args)
        except (ScholarEmbedError, ValueError, OSError) as error:
            # Start-up failures (model not found, no CUDA, a bad flag value, a busy port): one line, no traceback.
            print(f"scholarembed {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 1
    from scholarembed.errors import ScholarEmbedError as CallError

    try:
        return run_command(args)
    except CallError as error:
        # The server refused a call (an unknown collection, bad input, unavailable): one line, no traceback.
        print(f"scholarembed {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def run_command(args: argparse.Namespace) -> int:
    """Every command but serve and compile: clients of a server, or in-process bulk work."""
    if args.command == "info":
        from scholarembed import Client

        with Client(args.server) as client:
            print(json.dumps(client.model_info().__dict__, indent=2))
        return 0
    if args.command == "index":
        return index_corpus(args)
    if args.command == "search":
        return search_table(args)
    if args.command == "load":
        from .ray.cli import load_command

        return load_command(args)
    if args.command == "embed" and args.engine == "ray":
        from .ray.cli import embed_with_ray

        return embed_with_ray(args)
    if args.command == "eval":
        from .evaluation import evaluate_beir

        print(json.dumps(evaluate_beir(args), indent=2))
        return 0
    return embed_file(args)


def serve_or_compile(args: argparse.Namespace) -> int:
    from .app import load_engine, with_buckets
    from .app import serve as run_server
    from .config import batch_token_budget

    config = from_arguments(args)
    if args.command == "serve":
        status = asyncio.run(run_server(config))
        if status:
            # Broken (see lifecycle): a thread may be stuck in the device for good, and the interpreter would
            # wait for it at exit, so exit without joining threads (the index is already closed).
            logging.shutdown()
            os._exit(status)
        return 0
    from .model.compilation import save_artifacts

    engine = load_engine(config)
    config = dataclasses.replace(
        config,
        compile="on",
        max_batch_tokens=batch_token_budget(config.max_batch_tokens, engine.model.device.type),
    )
    engine = with_buckets(engine, config)
    runner = engine.runner
    runner.warmup()  # compiles every bucket length
    assert runner.buckets is not None
    path = save_artifacts(
        args.output,
        {
            "model": engine.model.source,
            "device": str(engine.model.device),
            "dtype": engine.model.dtype_name,
            "compile_mode": runner.compile_mode,
            "bucket_lengths": list(runner.buckets.lengths),
            "max_batch_tokens": runner.buckets.max_batch_tokens,
        },
    )
    print(f"wrote {path} ({path.stat().st_size} bytes, {runner.compile_seconds:.1f}s of compiling)", file=sys.stderr)
    return 0


def read_corpus(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                record.setdefault("id", record.get("_id"))
                yield record


def index_corpus(args: argparse.Namespace) -> int:
    """Upsert what the collection lacks. Already-stored ids are skipped, so an interrupted run resumes."""
    from itertools import islice

    from tqdm import tqdm

    from scholarembed import Client, NotFoundError

    total = count_items(args.corpus)
    with Client(args.server, timeout=None) as client:
        try:
            client.get_collection(args.collection)
            exists = True
        except NotFoundError:
            exists = False
        progress = tqdm(total=total, unit="passage", disable=args.no_progress, file=sys.stderr)

        def missing() -> Iterator[dict[str, Any]]:
            records = read_corpus(args.corpus)
            while chunk := list(islice(records, 2000)):
                stored = (
                    {p.id for p in client.get_passages(args.collection, [r["id"] for r in chunk])} if exists else set()
                )
                progress.update(len(stored))
                yield from (r for r in chunk if r["id"] not in stored)

        upserted = 0
        for ack in client.upsert_stream(
            args.collection, missing(), batch_size=args.batch_size, index_kind=args.index_kind
        ):
            upserted += ack.upserted
            progress.update(ack.upserted)
        progress.close()
        collection = client.get_collection(args.collection)
    print(f"upserted {upserted}; {args.collection!r} holds {collection.passage_count} passages", file=sys.stderr)
    server = [] if args.server == DEFAULT_SERVER else ["--server", args.server]
    search = ["scholarembed", "search", "your question", "--collection", args.collection, *server]
    print(f"search it: {shlex.join(search)}", file=sys.stderr)
    return 0


def search_table(args: argparse.Namespace) -> int:
    import shutil

    from scholarembed import Client

    with Client(args.server) as client:
        hits = client.search(
            args.query, collection=args.collection, top_k=args.top_k, dimensions=args.dimensions,
            include_passages=True, mode=args.mode,
        )  # fmt: skip
    width = shutil.get_terminal_size((120, 20)).columns
    hybrid = args.mode == "hybrid"
    places = f"  {'dense':>5}  {'lex':>5}" if hybrid else ""
    print(f"{'rank':>4}  {'score':>6}{places}  {'id':<16}  title / text")
    for rank, hit in enumerate(hits, start=1):
        snippet = (hit.title + " | " if hit.title else "") + hit.text
        if hybrid:  # each list's rank, "-" where the passage was not among its candidates
            places = "".join(f"  {place.rank if place else '-':>5}" for place in (hit.dense, hit.lexical))
        print(f"{rank:>4}  {hit.score:6.4f}{places}  {hit.id[:16]:<16}  {snippet[: max(20, width - 48)]}")
    return 0


def read_items(path: Path, input_type: str, text_field: str, title_field: str) -> Iterator[StreamItem]:
    """Texts (or (title, text) pairs for passages) from a JSONL or plain-text file, lazily."""
    is_jsonl = path.suffix in (".jsonl", ".json", ".ndjson")
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if not is_jsonl:
                yield line.rstrip("\n")
                continue
            record: Any = json.loads(line)
            if isinstance(record, str):
                yield record
                continue
            if text_field not in record:
                raise SystemExit(f"{path}:{line_number}: no {text_field!r} field")
            title = str(record.get(title_field) or "") if input_type == "passage" else ""
            yield (title, str(record[text_field])) if title else str(record[text_field])


def count_items(path: Path) -> int:
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def embed_file(args: argparse.Namespace) -> int:
    """Write vectors into a preallocated .npy memmap as they arrive: memory stays flat on any corpus size."""
    from tqdm import tqdm

    args.input = Path(args.input)
    total = count_items(args.input)
    items = read_items(args.input, args.type, args.text_field, args.title_field)
    if args.model:
        dimensions, batches = _embed_in_process(args, items)
    else:
        dimensions, batches = _embed_through_server(args, items)
    output = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32, shape=(total, dimensions))
    written = 0
    with tqdm(total=total, unit="text", disable=args.no_progress, file=sys.stderr) as progress:
        for vectors in batches:
            output[written : written + len(vectors)] = vectors
            written += len(vectors)
            progress.update(len(vectors))
    output.flush()
    del output
    print(f"wrote {written} x {dimensions} vectors to {args.output}", file=sys.stderr)
    return 0


def _embed_through_server(args: argparse.Namespace, items: Iterator[StreamItem]) -> tuple[int, Iterator[np.ndarray]]:
    from scholarembed import Client

    client = Client(args.server, timeout=None)
    info = client.model_info()
    dimensions = args.dimensions or info.dimensions

    def batches() -> Iterator[np.ndarray]:
        with client:
            yield from client.embed_stream(
                items, input_type=args.type, dimensions=args.dimensions, batch_size=args.batch_size
            )

    return dimensions, batches()


def _embed_in_process(args: argparse.Namespace, items: Iterator[StreamItem]) -> tuple[int, Iterator[np.ndarray]]:
    from .engine import EmbeddingEngine
    from .model.prompts import InputType

    engine = EmbeddingEngine.load(args.model, device=args.device)
    dimensions = engine.check_dimensions(args.dimensions)
    input_type = InputType(args.type)
    chunk_size = max(args.batch_size, 1024)  # large chunks let the engine sort by length

    def batches() -> Iterator[np.ndarray]:
        from itertools import islice

        while chunk := list(islice(items, chunk_size)):
            pairs = [("", item) if isinstance(item, str) else item for item in chunk]
            titles = [title for title, _ in pairs]
            texts = [text for _, text in pairs]
            yield engine.encode(
                texts, input_type, titles=titles if any(titles) else None, dimensions=dimensions
            ).vectors

    return dimensions, batches()


if __name__ == "__main__":
    raise SystemExit(main())
