"""The VectorIndex contract: what the search servicer needs from a store, whichever engine backs it.

Vectors handed to a store are unit-length float32 at the model's full dimension. Searching at a
smaller Matryoshka dimension uses the stored prefix, re-normalised. Every method is synchronous and
thread-safe; the servicer calls them from worker threads.
"""

from __future__ import annotations

import abc
import enum
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from ..errors import FailedPreconditionError, InvalidArgumentError, ScholarEmbedError

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# What a metadata value must look like to be read as a number by a range (the proto's NumericRange).
NUMBER = re.compile(r"[ \t\n\r]*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?[ \t\n\r]*")


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


class LexicalUnavailableError(FailedPreconditionError):
    """The collection has no lexical index (a Milvus collection made before lexical search existed)."""


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    passage: StoredPassage | None = None  # filled when the search asked for passages


@dataclass(frozen=True)
class Equals:
    key: str
    value: str


@dataclass(frozen=True)
class AnyOf:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """Bounds on a value read as a number (`as_number`); None means unbounded on that side."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def admits(self, number: float) -> bool:
        return (
            (self.gt is None or number > self.gt)
            and (self.gte is None or number >= self.gte)
            and (self.lt is None or number < self.lt)
            and (self.lte is None or number <= self.lte)
        )


Condition = Equals | AnyOf | Range
MetadataFilter = Mapping[str, str] | Sequence[Condition]
"""Exact matches as a mapping (what stores took first), or conditions; every one must hold (AND)."""


def conditions_of(metadata_filter: MetadataFilter | None) -> list[Condition]:
    if not metadata_filter:
        return []
    if isinstance(metadata_filter, Mapping):
        return [Equals(key, value) for key, value in sorted(metadata_filter.items())]
    return list(metadata_filter)


def as_number(value: str) -> float | None:
    """The number a metadata value stands for in a range, or None if it is not one."""
    if not NUMBER.fullmatch(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None  # "1e999" overflows: not a number we can compare


def matches(metadata: Mapping[str, str], conditions: Sequence[Condition]) -> bool:
    """The reference semantics of a filter, which every store's query must reproduce."""
    for condition in conditions:
        value = metadata.get(condition.key)
        if value is None:
            return False
        if isinstance(condition, Equals) and value != condition.value:
            return False
        if isinstance(condition, AnyOf) and value not in condition.values:
            return False
        if isinstance(condition, Range):
            number = as_number(value)
            if number is None or not condition.admits(number):
                return False
    return True


@dataclass(frozen=True)
class CommittedUpsert:
    """A write that is durable, but may not be found by every kind of search until `wait_searchable()`."""

    count: int
    wait_searchable: Callable[[], None] = lambda: None  # blocks until every search mode finds the write


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

    def commit_upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> CommittedUpsert:
        """`upsert` in two steps, for a caller that orders its writes and acknowledges each: durable when this
        returns, searchable every way once `wait_searchable()` returns. The next write may commit before
        that, so a store whose secondary index catches up (the embedded store's lexical index) can make
        several writes searchable with one commit. A store whose writes are searchable once durable
        returns at once."""
        return CommittedUpsert(self.upsert(name, passages, vectors))

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
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        """Nearest passages per query by cosine, best first. `queries` are unit vectors of width d,
        a Matryoshka dimension; stored vectors are cut to d and re-normalised."""

    def lexical_search(
        self,
        name: str,
        queries: Sequence[str],
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        """Best passages per query by BM25 over title and text, best first (score: higher is better).
        The query is split into words by the tokenizer that indexed the passages, so no text is
        syntax; any word may match, and a query without words finds nothing.
        Raises LexicalUnavailableError where the collection has no lexical index."""
        raise LexicalUnavailableError(f"collection {name!r}: this store has no lexical search")

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""
