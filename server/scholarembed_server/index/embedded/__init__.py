"""The embedded store: collections under one data directory, each its own folder.

    __init__.py     EmbeddedIndex: the data directory, creating, opening and deleting collections
    collection.py   a collection: SQLite as the one source of truth, vectors.bin, the commit
                    protocol, snapshots that readers search without waiting for writers
    lexical.py      its lexical index: tantivy, caught up from SQLite through an outbox
    vectors.py      its vector indexes: exact flat matrices, HNSW and IVF, built in the background

<data dir>/.lock is held (a POSIX lock) by the one process that has the store open.

A collection is created in .creating-<name> and deleted as .deleting-<name>, each renamed in one step
and the rename fsynced; leftovers of an interrupted create or delete are removed on open.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ...errors import ScholarEmbedError
from ..base import (
    CollectionInfo,
    CollectionNotFoundError,
    CommittedUpsert,
    CorruptCollectionError,
    Hit,
    IndexKind,
    MetadataFilter,
    StoredPassage,
    VectorIndex,
    VectorStorage,
    check_collection_name,
    conditions_of,
)
from .collection import Collection, committed_passages, create_files
from .vectors import fsync_directory

log = logging.getLogger(__name__)


class DataDirInUseError(ScholarEmbedError):
    """Another process (a running server, a `scholarembed load`) has the data directory open."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def _lock_data_dir(data_dir: Path) -> Any:
    """Hold a POSIX lock on <data_dir>/.lock for as long as the store is open. One process at a time:
    two writers would each append to vectors.bin unseen by the other. POSIX (not flock) locks belong to
    the process, so reopening in the same process, as tests that simulate a crash do, still works."""
    lock = (data_dir / ".lock").open("a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        raise DataDirInUseError(
            f"data dir {str(data_dir)!r} is in use by another process (a running server or a load); "
            "stop it first, load through that server, or give this one another folder (--data-dir)"
        ) from error
    return lock


class EmbeddedIndex(VectorIndex):
    """Collections under one data directory; the default store (`--data-dir`)."""

    def __init__(self, data_dir: str | Path, *, search_device: str = "cpu") -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._data_dir_lock = _lock_data_dir(self.data_dir)
        self.search_device = search_device
        self._lock = threading.Lock()  # creating and deleting collections
        self._collections: dict[str, Collection] = {}
        self._refused: dict[str, str] = {}  # name -> why it cannot be served (CorruptCollectionError)
        for folder in sorted(self.data_dir.iterdir()):
            if folder.is_dir() and folder.name.startswith((".creating-", ".deleting-")):
                log.warning("removing %s, left by an interrupted create or delete", folder)
                shutil.rmtree(folder)
            elif (folder / "collection.sqlite").exists():
                try:
                    self._collections[folder.name] = Collection(folder, search_device)
                except CorruptCollectionError as error:
                    log.error("refusing collection %r: %s", folder.name, error)
                    self._refused[folder.name] = str(error)
                    continue
                log.info(
                    "opened collection %r: %d passages",
                    folder.name,
                    self._collections[folder.name].info().passage_count,
                )

    def _get(self, name: str) -> Collection:
        check_collection_name(name)
        collection = self._collections.get(name)
        if collection is None:
            if name in self._refused:
                raise CorruptCollectionError(self._refused[name])
            raise CollectionNotFoundError(name)
        return collection

    def create_collection(
        self, name: str, *, dimensions: int, model: str, index_kind: IndexKind, vector_storage: VectorStorage
    ) -> CollectionInfo:
        check_collection_name(name)
        with self._lock:
            if name in self._collections:
                return self._collections[name].info()
            if name in self._refused:
                raise CorruptCollectionError(self._refused[name])
            folder = self.data_dir / name
            staging = self.data_dir / f".creating-{name}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            create_files(
                staging, dimensions=dimensions, model=model, index_kind=index_kind, vector_storage=vector_storage
            )
            os.replace(staging, folder)  # a collection appears whole or not at all
            fsync_directory(self.data_dir)
            self._collections[name] = Collection(folder, self.search_device)
            return self._collections[name].info()

    def get_collection(self, name: str) -> CollectionInfo:
        return self._get(name).info()

    def list_collections(self) -> list[CollectionInfo]:
        with self._lock:
            collections = [self._collections[name] for name in sorted(self._collections)]
        return [collection.info() for collection in collections]

    def delete_collection(self, name: str) -> int:
        check_collection_name(name)
        with self._lock:
            if name in self._refused:
                count = committed_passages(self.data_dir / name)
                self._remove_folder(name)
                del self._refused[name]
                return count
            collection = self._get(name)
            count = collection.info().passage_count
            collection.close()  # waits for the calls in progress; later ones find the collection gone
            del self._collections[name]
            self._remove_folder(name)
            return count

    def _remove_folder(self, name: str) -> None:
        trash = self.data_dir / f".deleting-{name}"
        os.replace(self.data_dir / name, trash)
        fsync_directory(self.data_dir)  # the delete is done once the rename is on disk
        shutil.rmtree(trash)

    def upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> int:
        return self._get(name).upsert(passages, vectors)

    def commit_upsert(self, name: str, passages: Sequence[StoredPassage], vectors: np.ndarray) -> CommittedUpsert:
        return self._get(name).commit_upsert(passages, vectors)

    def delete(self, name: str, ids: Sequence[str]) -> int:
        return self._get(name).delete(ids)

    def get(self, name: str, ids: Sequence[str]) -> list[StoredPassage]:
        return self._get(name).get(ids)

    def search(
        self,
        name: str,
        queries: np.ndarray,
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        return self._get(name).search(queries, top_k, conditions_of(metadata_filter), include_passages)

    def lexical_search(
        self,
        name: str,
        queries: Sequence[str],
        top_k: int,
        *,
        metadata_filter: MetadataFilter | None = None,
        include_passages: bool = False,
    ) -> list[list[Hit]]:
        return self._get(name).lexical_search(queries, top_k, conditions_of(metadata_filter), include_passages)

    def wait_until_indexed(self, name: str, dimensions: Sequence[int], timeout: float = 3600.0) -> None:
        """Build the vector indexes of collection `name` at `dimensions` now, and wait for them; searches
        do not need this (until an index is ready they are exact), benchmarks and tests of the indexes do."""
        self._get(name).wait_until_indexed(dimensions, timeout)

    def close(self) -> None:
        with self._lock:
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()
            self._data_dir_lock.close()
