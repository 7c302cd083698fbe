"""Passage stores behind one VectorIndex contract: the embedded FAISS + SQLite store, or Milvus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import VectorIndex

if TYPE_CHECKING:
    import torch

    from ..config import ServerConfig


def open_index(
    config: ServerConfig, device: torch.device, matryoshka_dims: Sequence[int] | None = None
) -> VectorIndex | None:
    """The store the configuration asks for, or None when search is not enabled.

    `matryoshka_dims` are the dimensions searches may ask for (the engine's); Milvus collections
    store a field for each, so searching them is exact. Without them, --matryoshka-dims is used.
    """
    if config.index_uri:
        from .milvus import MilvusIndex

        return MilvusIndex(config.index_uri, matryoshka_dims=matryoshka_dims or config.matryoshka_dim_list)
    if config.data_dir:
        from .embedded import EmbeddedIndex

        # Exact search runs next to the model: on its GPU when it has one.
        return EmbeddedIndex(config.data_dir, search_device="cpu" if device.type == "cpu" else str(device))
    return None
