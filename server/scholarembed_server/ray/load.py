"""Load precomputed shards into a collection without embedding anything again. Nothing here imports Ray.

The vectors come from the shard files; each passage's text, title and metadata come from the corpus
rows the shard was embedded from (the manifest records where: a shard is a fixed range of one input
file), and the ids must agree row by row. Each batch is checked by `validate_passages`, as an
UpsertPassages request is (ids non-empty, at most 512 bytes, unique in the batch; texts non-empty),
naming the record at fault. Everything is committed through `VectorIndex.upsert`, the store's one commit
path, so a load is exactly as durable as UpsertPassages and gets whatever else a
store keeps per passage. A rerun skips batches whose ids are all stored already.

Refused with a clear error, before anything is written: an incomplete run (missing shards), shards
of another model, dimension or encoding than the collection, shards that are not full-dimension
floats (collections keep full vectors and cut Matryoshka prefixes at search time), query vectors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..corpus import Columns, Record, record_error
from ..errors import FailedPreconditionError, InvalidArgumentError
from ..index.base import (
    CollectionNotFoundError,
    IndexKind,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    check_collection_name,
)
from ..searcher import validate_passages
from .shards import MANIFEST, Shard, ShardsError, completed_shards, read_json, read_shard, read_shard_rows


@dataclass
class LoadSummary:
    collection: str
    loaded: int
    skipped: int  # already stored (an earlier, interrupted load)
    passage_count: int
    seconds: float

    def line(self) -> str:
        return (
            f"loaded {self.loaded:,} passages ({self.skipped:,} already stored) in {self.seconds:.1f} s; "
            f"{self.collection!r} holds {self.passage_count:,}"
        )


def run_metadata(shards: str) -> dict[str, Any]:
    """The manifest of a complete embed run; ShardsError if it is not one."""
    manifest = read_json(shards, MANIFEST)
    if manifest is None:
        raise ShardsError(f"{shards!r} is not the output of `scholarembed embed --engine ray` (no {MANIFEST})")
    planned = [Shard.from_json(s) for s in manifest["shards"]]
    missing = [s.name for s in planned if s.name not in completed_shards(shards)]
    if missing:
        raise ShardsError(
            f"{shards!r} is incomplete: {len(missing)} of {len(planned)} shards are missing (e.g. {missing[0]}); "
            "run the same embed command again to finish it"
        )
    return manifest


def check_loadable(metadata: dict[str, Any], where: str) -> None:
    if metadata["input_type"] != "passage":
        raise ShardsError(f"{where}: holds {metadata['input_type']} vectors; only passage vectors go into a collection")
    if metadata["encoding"] == "binary":
        raise ShardsError(f"{where}: binary vectors cannot be loaded; collections store float vectors")
    if metadata["dimensions"] != metadata["model_dimensions"]:
        raise ShardsError(
            f"{where}: {metadata['dimensions']}-d vectors; collections store the model's full "
            f"{metadata['model_dimensions']} dimensions (smaller Matryoshka dimensions are cut at search time): "
            "embed with dimensions 0"
        )


def load_shards(
    shards: str,
    collection: str,
    index: VectorIndex,
    *,
    index_kind: str = "flat",
    vector_storage: str = "float16",
    batch_size: int = 1000,
    progress: bool = True,
) -> LoadSummary:
    """Upsert every row of the complete run in `shards` into `collection` (created if missing) of `index`."""
    from tqdm import tqdm

    started = time.perf_counter()
    check_collection_name(collection)
    manifest = run_metadata(shards)
    metadata = manifest["metadata"]
    check_loadable(metadata, shards)
    model, dimensions = metadata["model"], metadata["model_dimensions"]
    try:
        info = index.get_collection(collection)
    except CollectionNotFoundError:
        info = index.create_collection(
            collection, dimensions=dimensions, model=model, index_kind=IndexKind(index_kind),
            vector_storage=VectorStorage(vector_storage),
        )  # fmt: skip
    if info.model != model or info.dimensions != dimensions:
        raise FailedPreconditionError(
            f"collection {collection!r} holds {info.dimensions}-d vectors of model {info.model!r}; "
            f"the shards in {shards!r} hold {dimensions}-d vectors of {model!r}"
        )
    columns = Columns(**manifest["key"]["settings"]["columns"])
    planned = [Shard.from_json(s) for s in manifest["shards"]]
    loaded = skipped = 0
    bar = tqdm(total=sum(s.rows for s in planned), unit="passage", disable=not progress, file=sys.stderr)
    for shard in planned:
        written = read_shard(shards, shard.name)
        where = f"{shards}/{shard.name}.parquet"
        for key in ("model", "model_source", "dimensions", "encoding", "input_type"):
            if written.metadata[key] != metadata[key]:
                raise ShardsError(f"{where}: {key} {written.metadata[key]!r} differs from the run's {metadata[key]!r}")
        records = read_shard_rows(shard, columns)
        if [r.id for r in records] != written.ids:
            raise ShardsError(f"{where}: its ids differ from the corpus rows it was embedded from; the corpus changed")
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            if len(index.get(collection, [r.id for r in batch])) == len(batch):
                skipped += len(batch)
            else:
                loaded += index.upsert(collection, checked_passages(batch), written.vectors[start : start + batch_size])
            bar.update(len(batch))
    bar.close()
    return LoadSummary(
        collection, loaded, skipped, index.get_collection(collection).passage_count, time.perf_counter() - started
    )


def checked_passages(batch: list[Record]) -> list[StoredPassage]:
    """The batch as passages, validated as an UpsertPassages request is; an error names the record."""
    try:
        return validate_passages(batch, len(batch))
    except InvalidArgumentError as error:
        raise record_error(batch, error) from None


def open_store(data_dir: str | None, index_uri: str | None, matryoshka_dims: Sequence[int]) -> VectorIndex:
    """The store a server with these flags would open (see `index.open_index`), on the CPU."""
    import torch

    from ..config import ServerConfig
    from ..index import open_index

    config = ServerConfig(data_dir=data_dir, index_uri=index_uri)
    store = open_index(config, torch.device("cpu"), list(matryoshka_dims))
    if store is None:
        raise ValueError("give a data dir (embedded store) or an index URI (Milvus)")
    return store
