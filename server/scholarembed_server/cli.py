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
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, add_arguments, from_arguments, missing_extra

DEFAULT_SERVER = "127.0.0.1:50051"  # where the client commands look for a server; serve's default address

if TYPE_CHECKING:
    from .config import ServerConfig


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
    from .names import ENCODING_NAMES, INPUT_TYPE_NAMES, TRUNCATION_NAMES

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
        "--output",
        required=True,
        help="output .npy file: (n, dimensions) float32 or float16, or (n, dimensions / 8) uint8 packed bits "
        "for --encoding binary; with --engine ray: a folder or URI",
    )
    embed.add_argument(
        "--type",
        required=True,
        choices=list(INPUT_TYPE_NAMES),
        help="how the texts are prompted; required: the model is asymmetric, so there is no default",
    )
    embed.add_argument("--dimensions", type=int, default=0, help="Matryoshka dimension; 0 = full size")
    embed.add_argument("--encoding", default="float32", choices=list(ENCODING_NAMES), help="vector layout")
    embed.add_argument(
        "--truncation",
        default="end",
        choices=list(TRUNCATION_NAMES),
        help="a text over max_tokens: cut at the end (default) or refuse it (not with --server yet)",
    )
    embed.add_argument("--text-field", default="text", help="JSONL field holding the text")
    embed.add_argument("--title-field", default="title", help="JSONL field holding the title (passages)")
    embed.add_argument("--batch-size", type=int, default=64, help="texts per request")
    source = embed.add_mutually_exclusive_group()
    source.add_argument("--server", default=DEFAULT_SERVER, help="server address (default)")
    source.add_argument("--model", help="run in-process with this model (hub id or folder) instead of a server")
    embed.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_arguments(
        embed.add_argument_group("with --model: the engine settings of `serve`, with the same defaults"),
        only=ENGINE_SETTINGS,
    )
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

    from .errors import ScholarEmbedError

    try:
        return run_command(args)
    except (CallError, ScholarEmbedError, ValueError, OSError) as error:
        # A refused call (an unknown collection, bad input, unavailable), a bad record or setting of an
        # in-process run, an unwritable output: one line, no traceback.
        print(f"scholarembed {args.command}: error: {' '.join(error_line(error).split())}", file=sys.stderr)
        return 1


def error_line(error: BaseException) -> str:
    """The code and the message: "INVALID_ARGUMENT: corpus.jsonl:3: must not be empty or whitespace only"."""
    from .errors import ScholarEmbedError

    if isinstance(error, ScholarEmbedError):  # raised in this process; a server's errors say their code already
        return f"{error.code.name}: {error}"
    return str(error)


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


def index_corpus(args: argparse.Namespace) -> int:
    """Upsert what the collection lacks. Already-stored ids are skipped, so an interrupted run resumes."""
    from tqdm import tqdm

    from scholarembed import Client, NotFoundError, Passage

    from .corpus import count_records, read_file

    total = count_records(args.corpus)
    with Client(args.server, timeout=None) as client:
        try:
            client.get_collection(args.collection)
            exists = True
        except NotFoundError:
            exists = False
        progress = tqdm(total=total, unit="passage", disable=args.no_progress, file=sys.stderr)

        def missing() -> Iterator[Passage]:
            records = read_file(args.corpus, with_id=True)
            while chunk := list(islice(records, 2000)):
                stored = (
                    {p.id for p in client.get_passages(args.collection, [r.id for r in chunk])} if exists else set()
                )
                progress.update(len(stored))
                yield from (Passage(r.id, r.text, r.title, r.metadata) for r in chunk if r.id not in stored)

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


# The engine settings an in-process `embed` takes from serve's flags (--model is embed's own).
ENGINE_SETTINGS = (
    "revision", "device", "dtype", "max_tokens", "matryoshka_dims", "max_batch_tokens", "tokenizer_threads",
    "compile", "compile_mode", "compile_artifacts", "compile_cache_dir", "buckets", "tail", "bucket_row_step",
    "forward_timeout_s",
)  # fmt: skip


def engine_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig `serve` would build from the same flags: one engine loader for every door."""
    from .config import ServerConfig

    return ServerConfig(model=args.model, **{name: getattr(args, name) for name in ENGINE_SETTINGS})


def embed_file(args: argparse.Namespace) -> int:
    """Write vectors into a preallocated .npy memmap as they arrive: memory stays flat on any corpus size."""
    from tqdm import tqdm

    from .corpus import Columns, CorpusError, count_records, read_file

    path = Path(args.input)
    try:
        total = count_records(path)
    except OSError as error:
        raise CorpusError(str(path), f"cannot be read: {error}") from error
    if not total:
        raise CorpusError(str(path), "no records")
    records = read_file(path, Columns(text=args.text_field, title=args.title_field or None))
    batches = _embed_in_process(args, records) if args.model else _embed_through_server(args, records)
    output: np.ndarray | None = None
    written = 0
    with tqdm(total=total, unit="text", disable=args.no_progress, file=sys.stderr) as progress:
        for vectors in batches:
            if output is None:  # the width and dtype are the first answer's: dimensions and encoding resolved
                output = np.lib.format.open_memmap(
                    args.output, mode="w+", dtype=vectors.dtype, shape=(total, vectors.shape[1])
                )
            output[written : written + len(vectors)] = vectors
            written += len(vectors)
            progress.update(len(vectors))
    assert output is not None
    output.flush()
    print(f"wrote {written} x {output.shape[1]} {output.dtype} vectors to {args.output}", file=sys.stderr)
    return 0


class Batches:
    """The input cut into requests of --batch-size records. The records of the requests not answered yet
    are kept (oldest first), so that an error naming `texts[i]` names the record: "corpus.jsonl:17"."""

    def __init__(self, records: Iterator[Any], size: int) -> None:
        self._records = records
        self._size = size
        self.unanswered: deque[list[Any]] = deque()

    def __iter__(self) -> Iterator[list[Any]]:
        while chunk := list(islice(self._records, self._size)):
            self.unanswered.append(chunk)
            yield chunk

    def answered(self) -> None:
        self.unanswered.popleft()

    def refusal(self, field: str, description: str) -> Exception:
        """The oldest unanswered request's error in this command's words: its record, or its flag."""
        from .corpus import record_error
        from .errors import InvalidArgumentError

        return record_error(self.unanswered[0], InvalidArgumentError(field, description), renamed=FLAGS)


# EmbedRequest fields as the flags that set them; "texts" is a whole request: --batch-size texts.
FLAGS = {
    "texts": "--batch-size", "input_type": "--type", "dimensions": "--dimensions", "encoding": "--encoding",
    "truncation": "--truncation",
}  # fmt: skip


def _titles(args: argparse.Namespace, chunk: list[Any]) -> list[str]:
    """Titles belong to passages only (--title-field); the query and raw prompts have no place for one."""
    titles = [record.title for record in chunk] if args.type == "passage" else []
    return titles if any(titles) else []


def _embed_through_server(args: argparse.Namespace, records: Iterator[Any]) -> Iterator[np.ndarray]:
    from scholarembed import Client, ScholarEmbedError

    if args.truncation != "end":
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(
            "--truncation",
            "error is not available with --server yet (the client's embed_stream sends no truncation): "
            "use --model or --engine ray",
        )
    batches = Batches(records, args.batch_size)

    def items() -> Iterator[str | tuple[str, str]]:
        for chunk in batches:
            titles = _titles(args, chunk)
            yield from (
                ((title, r.text) for title, r in zip(titles, chunk, strict=True)) if titles else (r.text for r in chunk)
            )

    with Client(args.server, timeout=None) as client:
        try:
            for vectors in client.embed_stream(
                items(), input_type=args.type, dimensions=args.dimensions, encoding=args.encoding,
                batch_size=args.batch_size,
            ):  # fmt: skip
                batches.answered()
                yield vectors
        except ScholarEmbedError as error:
            if error.field_violations:
                violation = error.field_violations[0]
                raise batches.refusal(violation.field, violation.description) from None
            raise


def _embed_in_process(args: argparse.Namespace, records: Iterator[Any]) -> Iterator[np.ndarray]:
    """The server's embedding path in this process (`InProcessEmbedder`): its validation, batcher and encodings."""
    from scholarembed import decode

    from .errors import InvalidArgumentError
    from .inprocess import InProcessEmbedder
    from .names import named_embed_request

    batches = Batches(records, args.batch_size)
    requests = (
        named_embed_request(
            [r.text for r in chunk], input_type=args.type, titles=_titles(args, chunk), dimensions=args.dimensions,
            encoding=args.encoding, truncation=args.truncation,
        )
        for chunk in batches
    )  # fmt: skip
    with InProcessEmbedder(engine_config(args)) as embedder:
        try:
            for response in embedder.embed_many(requests):
                batches.answered()
                yield decode(response).vectors
        except InvalidArgumentError as error:
            raise batches.refusal(error.field, error.description) from None


if __name__ == "__main__":
    raise SystemExit(main())
