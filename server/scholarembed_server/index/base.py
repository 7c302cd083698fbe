"""The VectorIndex contract: what the search servicer needs from a store, whichever engine backs it.

Vectors handed to a store are unit-length float32 at the model's full dimension. Searching at a
smaller Matryoshka dimension uses the stored prefix, re-normalised. Every method is synchronous and
thread-safe; the servicer calls them from worker threads.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from ..errors import InvalidArgumentError, ScholarEmbedError

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class IndexKind(enum.Enum):
    FLAT = "flat"
    HNSW = "hnsw"
    IVF = "ivf"


class VectorStorage(enum.Enum):
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class CollectionNotFoundError(ScholarEmbedError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} does not exist")


class StorageError(ScholarEmbedError):
    """A write failed (disk full, I/O error); nothing of the request was stored or acknowledged."""


class CorruptCollectionError(ScholarEmbedError):
    """A collection on disk is inconsistent and cannot be repaired automatically."""

    code = grpc.StatusCode.DATA_LOSS


@dataclass(frozen=True)
class StoredPassage:
    id: str
    title: str = ""
    text: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    passage: StoredPassage | None = None  # filled when the search asked for passages


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    passage_count: int
    dimensions: int
    index_kind: IndexKind
    vector_storage: VectorStorage
    model: str


def check_collection_name(name: str, field_name: str = "collection") -> str:
    if not COLLECTION_NAME.match(name):
        raise InvalidArgumentError(field_name, f"{name!r} is not 1 to 64 characters of [A-Za-z0-9_-]")
    return name


def prefix_normalised(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """float32 copy of the first `dimensions` components, each row re-normalised to unit length."""
    head = np.array(vectors[:, :dimensions], dtype=np.float32)  # a copy: the input may be a read-only memmap
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    head /= np.maximum(norms, 1e-12)
    return head


class VectorIndex(abc.ABC):
    """A store of collections of passages with their vectors."""

    @abc.abstractmethod
    def create_collection(
        self, name: str, *, dimensions: int, model: str, index_kind: IndexKind, vector_storage: VectorStorage
    ) -> CollectionInfo:
        """Create the collection, or return it unchanged if it exists."""

    @abc.abstractmethod
    def get_collection(self, name: str) -> CollectionInfo:
        """Raise CollectionNotFoundError if it does not exist."""

    @abc.abstractmethod
    def list_collections(self) -> list[CollectionInfo]: ...

    @abc.abstractmethod
    def delete_collection(self, name: str) -> int:
        """Delete it with all its data; return how many passages it held."""

    @abc.abstractmethod
    def upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        """Store passages with their (n, full dims) unit vectors, replacing existing ids.

        All or nothing, and durable when it returns: the caller acknowledges only after this.
        """

    @abc.abstractmethod
    def delete(self, name: str, ids: Sequence[str]) -> int:
        """Delete passages by id; return how many existed."""

    @abc.abstractmethod
    def get(self, name: str, ids: Sequence[str]) -> list[StoredPassage]:
        """The stored passages among `ids`, in the order of `ids`; missing ids are left out."""

    @abc.abstractmethod
    def search(
        self,
        name: str,
        queries: np.ndarray,
        top_k: int,
        *,
        metadata_filter: Mapping[str, str] | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        """Nearest passages per query by cosine, best first. `queries` are unit vectors of width d,
        a Matryoshka dimension; stored vectors are cut to d and re-normalised."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""
