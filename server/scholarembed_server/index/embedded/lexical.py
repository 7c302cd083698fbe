"""The lexical index of a collection: tantivy, derived from the collection's SQLite database.

One tantivy index per collection, in <collection>/lexical/, with one document per passage:
    id    the passage id, untokenised: a document is deleted by it;
    row   the passage's SQLite row: hits are read back by it (a fast field), filters select by it;
    text  title and text, analysed by ANALYZER: runs of letters and digits, words over 40 bytes
          dropped, lowercased, folded to ASCII, English (Snowball) stemming; term frequencies
          only, since BM25 needs no positions. One field for both, as SciFact prefers it (nDCG@10
          0.687 against 0.666 for title and text as two fields).
A query is split into terms by the very analyzer object that indexes passages, and searched as the
disjunction of its distinct terms, ranked by BM25 (k1 = 1.2, b = 0.75); tantivy's block-max WAND
skips most documents that cannot reach the top k. English stopwords (Lucene's 33) are left out of a
query that has other words, as Lucene's English analyzer does (passages keep them, so a query of
stopwords alone still finds them): on SciFact that takes lexical nDCG@10 from 0.6867 to 0.6890 and
hybrid from 0.7144 to 0.7160. Query text is never parsed, so no text is syntax or an error.

SQLite stays the one source of truth; this index is derived from it and catches up from it:
  - Every write transaction of the collection appends the ids it touches to lexical_outbox
    (`enqueue`), so an acknowledged write is durable for this index too, after kill -9.
  - A catch-up applies outbox entries idempotently: for each id, delete its document, then add
    the passage as SQLite holds it now, if it still exists. Then tantivy commits (it fsyncs its
    segment files and renames meta.json into place: a crash leaves the old commit or the new one),
    the searcher is reloaded, and only then are the entries trimmed. A crash anywhere in between
    leaves entries that a replay applies again, which changes nothing.
  - On open, what the outbox holds is replayed; then the index must hold one document per passage.
    A different count (an index from before tantivy, lost or torn files) rebuilds it from SQLite:
    every id is enqueued again and replayed, a chunk per tantivy commit, with progress logged;
    interrupted, the next open resumes from the last trimmed chunk.
  - Group commit: a writer returns once `catch_up(its last outbox entry)` has made its passages
    searchable. One writer at a time leads a round, which applies what the outbox held when it
    began; writers that commit meanwhile wait, and the next round serves them all with one tantivy
    commit. (The gRPC door commits one request at a time and waits for it to be searchable before
    committing the next, so there each request leads its own round.)

What a reader sees between a write's SQLite commit and the end of its catch-up: tantivy's last
commit, each hit read back through its SQLite row. A deleted passage or a replaced version no
longer has that row, so it is never returned; the new passages and versions are not found
lexically yet (dense search finds them already), and a result may hold fewer than top_k hits. Once
the write returns, a lexical search finds everything it wrote. If a catch-up fails (a full disk),
the write that led it reports the error (its passages are stored all the same), and lexical search
is refused, naming the cause, until a later write or a restart catches up.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tantivy

from ..base import CollectionNotFoundError, LexicalUnavailableError, StorageError

log = logging.getLogger(__name__)

ANALYZER = "scholarembed_en"
WRITER_HEAP_BYTES = 128_000_000  # tantivy's default; split between its indexing threads
CATCH_UP_CHUNK = 50_000  # outbox entries applied per tantivy commit
OUTBOX_SCHEMA = "CREATE TABLE lexical_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL)"

# A test seam, None in production: called by a catch-up with its documents handed to tantivy's
# writer and its commit not yet made, so a test can hold a commit (with an event) or kill the
# process there (kill -9) and check what a reader, or the next open, sees.
before_commit: Callable[[], None] | None = None


def enqueue(db: sqlite3.Connection, ids: Sequence[str]) -> int:
    """In the caller's open transaction: note that passages `ids` changed. Returns the last entry's seq."""
    db.executemany("INSERT INTO lexical_outbox (id) VALUES (?)", [(id_,) for id_ in ids])
    return _last_seq(db)


def _last_seq(db: sqlite3.Connection) -> int:
    (last,) = db.execute("SELECT MAX(seq) FROM lexical_outbox").fetchone()
    return int(last or 0)


def _analyzer(*, without_stopwords: bool = False) -> tantivy.TextAnalyzer:
    """ANALYZER; `without_stopwords`: the same terms, less those of English stopwords (for queries)."""
    builder = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
    )
    if without_stopwords:
        builder = builder.filter(tantivy.Filter.stopword("english"))
    return builder.filter(tantivy.Filter.stemmer("english")).build()


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", tokenizer_name="raw", index_option="basic")
    builder.add_integer_field("row", indexed=True, fast=True)
    builder.add_text_field("text", tokenizer_name=ANALYZER, index_option="freq")
    return builder.build()


class LexicalIndex:
    """BM25 search over one collection's passages, caught up from its outbox.

    `connection` is this index's own connection to the collection's database, used by one catch-up
    at a time; it commits without fsync (synchronous=NORMAL), since a lost trim is only replayed.
    """

    def __init__(self, folder: Path, name: str, connection: sqlite3.Connection) -> None:
        self.folder = folder
        self.name = name
        self._db = connection
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._analyzer = _analyzer()
        self._query_analyzer = _analyzer(without_stopwords=True)
        self._index, self._writer = self._open()
        self._schema = self._index.schema
        self._applied = 0  # outbox entries up to this seq are searchable
        self._leading = False  # a catch-up round is running
        self._closed = False
        self._failure: str | None = None  # why the index is behind its passages, while it is
        self._condition = threading.Condition()

    def _open(self) -> tuple[tantivy.Index, tantivy.IndexWriter]:
        if self.folder.exists() and tantivy.Index.exists(str(self.folder)):
            try:
                return self._opened(tantivy.Index.open(str(self.folder)))
            except ValueError as error:  # tantivy's errors: a corrupt meta.json, missing segment files
                log.error("collection %r: its lexical index cannot be opened (%s); rebuilding it from its passages",
                          self.name, error)  # fmt: skip
                shutil.rmtree(self.folder)
        self.folder.mkdir(exist_ok=True)
        return self._opened(tantivy.Index(_schema(), path=str(self.folder)))

    def _opened(self, index: tantivy.Index) -> tuple[tantivy.Index, tantivy.IndexWriter]:
        index.register_tokenizer(ANALYZER, self._analyzer)
        index.config_reader(reload_policy="manual")  # reloaded after each commit, before a writer returns
        writer = index.writer(WRITER_HEAP_BYTES)
        index.reload()
        return index, writer

    # -- catching up -------------------------------------------------------------------------------

    def open_consistent(self, passages: int) -> None:
        """On open: replay the outbox, then rebuild from SQLite unless the index holds `passages` documents."""
        try:
            self.catch_up(_last_seq(self._db))
            documents = self._index.searcher().num_docs
            if documents == passages:
                return
            log.warning("collection %r: its lexical index holds %d documents for %d passages; rebuilding it",
                        self.name, documents, passages)  # fmt: skip
            self._writer.delete_all_documents()  # applied by the first commit of the replay below
            self._db.execute("INSERT INTO lexical_outbox (id) SELECT id FROM passages ORDER BY row")
            self.catch_up(_last_seq(self._db))
        except StorageError:
            log.exception("collection %r: lexical search is unavailable until its index catches up", self.name)

    def catch_up(self, seq: int) -> None:
        """Return once outbox entries up to `seq` are searchable: apply them, or wait for a round that does."""
        with self._condition:
            while self._applied < seq:
                if self._closed:
                    raise CollectionNotFoundError(self.name)
                if not self._leading:
                    self._leading = True
                    break
                self._condition.wait()
            else:
                return
        try:
            self._apply_outbox()
        finally:
            with self._condition:
                self._leading = False
                self._condition.notify_all()

    def _apply_outbox(self) -> None:
        """Apply the outbox entries written before this round began, CATCH_UP_CHUNK entries per tantivy
        commit. Entries written meanwhile are the next round's: a round always ends."""
        until, started, done = _last_seq(self._db), time.perf_counter(), 0
        (pending,) = self._db.execute(
            "SELECT COUNT(*) FROM lexical_outbox WHERE seq > ? AND seq <= ?", (self._applied, until)
        ).fetchone()
        while self._applied < until:
            try:
                applied, count = self._apply_chunk(until)
            except (ValueError, sqlite3.Error, OSError) as error:  # tantivy raises ValueError for its I/O errors
                with contextlib.suppress(ValueError):  # a writer that cannot roll back fails the next round too
                    self._writer.rollback()
                self._failure = f"collection {self.name!r}: its lexical index is behind its passages: {error}"
                raise StorageError(
                    f"collection {self.name!r}: the passages are stored, but the lexical index could not take "
                    f"them ({error}); it catches up on the next write or restart"
                ) from error
            with self._condition:
                self._applied = applied
            self._failure = None
            done += count
            if pending > CATCH_UP_CHUNK:  # a replay or a rebuild: say how far it is
                log.info("collection %r: lexical index: %d of %d outbox entries applied (%.0f s)", self.name,
                         done, pending, time.perf_counter() - started)  # fmt: skip

    def _apply_chunk(self, until: int) -> tuple[int, int]:
        """Apply the next entries up to `until`, commit, trim them; returns the last one's seq, and how many."""
        self._db.execute("BEGIN")  # one read transaction: the entries, and the passages as of the same commit
        try:
            entries = self._db.execute(
                "SELECT seq, id FROM lexical_outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (self._applied, until, CATCH_UP_CHUNK),
            ).fetchall()
            ids = list(dict.fromkeys(id_ for _, id_ in entries))
            passages = _current(self._db, ids)
        finally:
            self._db.execute("COMMIT")
        if not entries:
            return until, 0
        for id_ in ids:
            self._writer.delete_documents_by_term("id", id_)
        for id_, row, text in passages:
            self._writer.add_document(tantivy.Document(id=id_, row=row, text=text))
        if before_commit is not None:
            before_commit()
        self._writer.commit()
        self._index.reload()
        self._db.execute("DELETE FROM lexical_outbox WHERE seq <= ?", (entries[-1][0],))
        return int(entries[-1][0]), len(entries)

    # -- searching ---------------------------------------------------------------------------------

    def search(self, queries: Sequence[str], limit: int, rows: np.ndarray | None) -> list[list[tuple[int, float]]]:
        """(row, BM25 score) of the best `limit` documents per query, best first, among `rows` (None: all)."""
        if self._failure is not None:
            raise LexicalUnavailableError(self._failure)
        searcher = self._index.searcher()
        only = None
        if rows is not None:
            only = tantivy.Query.const_score_query(
                tantivy.Query.term_set_query(self._schema, "row", rows.tolist()), 0.0
            )
        results = []
        for text in queries:
            terms = dict.fromkeys(self._query_analyzer.analyze(text) or self._analyzer.analyze(text))
            if not terms:
                results.append([])
                continue
            query = tantivy.Query.boolean_query(
                [(tantivy.Occur.Should, tantivy.Query.term_query(self._schema, "text", term, index_option="freq"))
                 for term in terms]
            )  # fmt: skip
            if only is not None:
                query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query), (tantivy.Occur.Must, only)])
            hits = searcher.search(query, limit, count=False).hits  # no count: it would visit every match
            found_rows = searcher.fast_field_values("row", [address for _, address in hits])
            results.append([(int(row), float(score)) for (score, _), row in zip(hits, found_rows, strict=True)])
        return results

    def close(self) -> None:
        """Wait for a catch-up in progress, then release the writer (and tantivy's lock) and the connection."""
        with self._condition:
            self._closed = True
            while self._leading:
                self._condition.wait()
        self._writer.wait_merging_threads()
        self._db.close()


def _current(db: sqlite3.Connection, ids: list[str]) -> list[tuple[str, int, str]]:
    """(id, row, indexed text) of the passages among `ids` that exist now."""
    found = []
    for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
        chunk = ids[start : start + 900]
        query = f"SELECT id, row, title, text FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
        found += [(id_, row, f"{title}\n{text}") for id_, row, title, text in db.execute(query, chunk)]
    return found
