"""The Ray door's command line: `scholarembed embed --engine ray ...` and `scholarembed load ...`.

Only argparse at import time: the main CLI defines these options for every command, and Ray,
pyarrow and torch are imported only when one of these commands runs. Errors are raised for the main
CLI to print in one line.
"""

from __future__ import annotations

import argparse
import sys


def add_embed_arguments(embed: argparse.ArgumentParser) -> None:
    """Options of `embed` that only `--engine ray` reads."""
    embed.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: one process (in-process with --model, else through --server); ray: a Ray Data job writing "
        "Parquet shards to the --output folder, actors loading --model, or clients of --server (comma-separated "
        "addresses or a dns: target)",
    )
    ray = embed.add_argument_group("--engine ray")
    ray.add_argument("--ray-address", help="Ray cluster to join, e.g. ray://head:10001 or auto; default $RAY_ADDRESS")
    ray.add_argument("--actors", type=int, help="actor pool size; default one per GPU, or per CPU less one")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (torch threads on CPU)")
    ray.add_argument("--gpus-per-actor", type=float, help="default 1 with --model on a cluster with GPUs, else 0")
    ray.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per output shard: the unit of retry")
    ray.add_argument("--id-field", help="input field holding the id; default _id, else id")


def embed_with_ray(args: argparse.Namespace) -> int:
    from ..cli import engine_config
    from . import Columns, FleetSpec, embed_corpus

    fleet = None
    if not args.model:
        fleet = FleetSpec(tuple(address.strip() for address in args.server.split(",") if address.strip()))
    summary = embed_corpus(
        str(args.input),
        str(args.output),
        engine=engine_config(args) if args.model else None,
        fleet=fleet,
        input_type=args.type,
        dimensions=args.dimensions,
        encoding=args.encoding,
        truncation=args.truncation,
        columns=Columns(text=args.text_field, title=args.title_field or None, id=args.id_field),
        rows_per_shard=args.rows_per_shard,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        address=args.ray_address,
        progress=not args.no_progress,
    )
    print(summary.line(), file=sys.stderr)
    return 0


def add_load_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = commands.add_parser(
        "load",
        help="put the vectors of `embed --engine ray` into a collection, without embedding again",
        description="Upserts every shard of a complete run into a collection of the embedded store (--data-dir; "
        "the server using it must be stopped) or of Milvus (--index-uri). Text, title and metadata come from "
        "the corpus files the run read. Resumable: batches already stored are skipped.",
    )
    load.add_argument("--shards", required=True, help="the --output folder (or URI) of the embed run")
    load.add_argument("--collection", required=True)
    store = load.add_mutually_exclusive_group(required=True)
    store.add_argument("--data-dir", help="embedded store folder, as `serve --data-dir`")
    store.add_argument("--index-uri", help="Milvus URI, as `serve --index-uri`")
    load.add_argument("--index-kind", default="flat", choices=["flat", "hnsw", "ivf"], help="for a new collection")
    load.add_argument("--vector-storage", default="float16", choices=["float16", "float32"], help="for a new one")
    load.add_argument("--batch-size", type=int, default=1000, help="passages per commit")
    load.add_argument("--no-progress", action="store_true")


def load_command(args: argparse.Namespace) -> int:
    from .load import load_shards, open_store, run_metadata

    metadata = run_metadata(args.shards)["metadata"]
    store = open_store(args.data_dir, args.index_uri, metadata["matryoshka_dimensions"])
    try:
        summary = load_shards(
            args.shards,
            args.collection,
            store,
            index_kind=args.index_kind,
            vector_storage=args.vector_storage,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    finally:
        store.close()
    print(summary.line(), file=sys.stderr)
    return 0
