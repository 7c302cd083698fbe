"""The Ray door: bulk encoding of a corpus on a Ray cluster, and loading the result into a collection.

    from scholarembed_server.config import ServerConfig
    from scholarembed_server.ray import embed_corpus, load_shards

    embed_corpus("corpus.jsonl", "shards/", input_type="passage", engine=ServerConfig(model=...))

`embed_corpus` (encode.py) needs the `ray` extra; `load_shards` (load.py) and the shard format
(shards.py) need only pyarrow. Ray is imported only inside `embed_corpus` and its actors, so the
server and the base client never import it; the names below are imported on first use, so the CLI
can define its options without importing pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbedSummary": "encode",
    "FleetSpec": "encode",
    "embed_corpus": "encode",
    "LoadSummary": "load",
    "load_shards": "load",
    "open_store": "load",
    "Columns": "shards",  # the corpus reader's, as the shards read them
    "CorpusError": "shards",
    "ShardsError": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
