"""The one corpus reader: JSONL records (BEIR: `_id` or `id`, `text`, optional `title` and `metadata`),
Parquet rows with the same columns (read by ray/shards.py through `record`), or plain text, one text a
line. The CLI's `embed` and `index`, Ray's shards and the benchmarks all read corpora here.

The reader checks shape only: each line is a JSON object, the text field is there and is a string, an
id is there where one is needed. What the values may be (an empty text, a repeated id, ...) is for the
shared validators (`validate_embed_request`, `validate_passages`), which a door calls with the records'
places at hand (`Record.where`, e.g. "corpus.jsonl:17"), to name the record at fault in their words.

Only the standard library: the light client install runs `scholarembed index` and `embed --server`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import InvalidArgumentError

ID_FIELDS = ("_id", "id")  # BEIR writes _id; either is accepted
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class CorpusError(InvalidArgumentError):
    """A record cannot be read as asked (bad JSON, a missing field); `field` is where: "corpus.jsonl:17"."""


@dataclass(frozen=True)
class Columns:
    """Which input fields hold what; `id` None means `_id`, else `id`."""

    text: str = "text"
    title: str | None = "title"
    id: str | None = None


@dataclass(frozen=True)
class Record:
    """One input text with its place in the input, for messages."""

    where: str  # "path:line" (JSONL, text) or "path row n" (Parquet)
    text: str
    title: str = ""
    id: str = ""  # "" where the input has no ids (plain text) and none is needed
    metadata: dict[str, str] = field(default_factory=dict)  # BEIR's per-record "metadata" object


class BinaryStream(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def record(row: Mapping[str, Any], columns: Columns, where: str, *, with_id: bool) -> Record:
    """The one place an input row (a JSON object, a Parquet row) becomes a Record."""
    id_fields = (columns.id,) if columns.id else ID_FIELDS
    identifier = ""
    if with_id:
        id_field = next((name for name in id_fields if name in row), None)
        if id_field is None or row[id_field] is None:
            raise CorpusError(where, f"no {' or '.join(map(repr, id_fields))} field")
        identifier = str(row[id_field])
    if columns.text not in row:
        raise CorpusError(where, f"no {columns.text!r} field")
    text = row[columns.text]
    if not isinstance(text, str):
        raise CorpusError(where, f"{columns.text!r} must be a string, got {type(text).__name__}")
    title = row.get(columns.title) if columns.title else None
    extra = row.get("metadata")
    return Record(
        where=where,
        text=text,
        title=str(title) if title else "",
        id=identifier,
        metadata={str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {},
    )


def record_error(
    records: Sequence[Record], error: InvalidArgumentError, renamed: Mapping[str, str] | None = None
) -> InvalidArgumentError:
    """A validator's error about a request made of `records`, in the words of a door that reads files:
    `texts[i]` or `passages[i].<field>` becomes the record's place ("corpus.jsonl:17: id: ..."), any other
    field is `renamed` (to the flag that set it, say)."""
    match = re.fullmatch(r"(?:texts|passages)\[(\d+)\](?:\.(\w+))?", error.field)
    if match and int(match.group(1)) < len(records):
        field = f"{match.group(2)}: " if match.group(2) else ""
        return CorpusError(records[int(match.group(1))].where, field + error.description)
    return InvalidArgumentError((renamed or {}).get(error.field, error.field), error.description)


def check_columns(names: Iterable[str], columns: Columns, where: str, *, with_id: bool) -> None:
    """Refuse an input whose columns (a Parquet schema, a first record's keys) lack a needed field."""
    record(dict.fromkeys(names, ""), columns, where, with_id=with_id)


def lines(stream: BinaryStream, chunk_bytes: int = 1 << 22) -> Iterator[bytes]:
    """Lines of a binary stream, newline kept, so byte offsets add up."""
    rest = b""
    while chunk := stream.read(chunk_bytes):
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if rest:
        yield rest


def parse_line(line: bytes | str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorpusError(where, f"not a JSON object: {error}") from error
    if not isinstance(row, dict):
        raise CorpusError(where, "not a JSON object")
    return row


def read_jsonl(
    stream: BinaryStream, path: str, columns: Columns, *, with_id: bool, first_line: int = 1
) -> Iterator[Record]:
    """The records of a JSONL stream (from its line `first_line` on); blank lines are skipped."""
    for number, line in enumerate(lines(stream), start=first_line):
        if line.strip():
            yield record(parse_line(line, f"{path}:{number}"), columns, f"{path}:{number}", with_id=with_id)


def read_text(stream: BinaryStream, path: str) -> Iterator[Record]:
    """One record per non-blank line of a UTF-8 text file, the line (without its newline) as the text."""
    for number, line in enumerate(lines(stream), start=1):
        if line.strip():
            try:
                yield Record(f"{path}:{number}", line.rstrip(b"\r\n").decode("utf-8"))
            except UnicodeDecodeError as error:
                raise CorpusError(f"{path}:{number}", f"not UTF-8: {error}") from error


def is_jsonl(path: str | Path) -> bool:
    return str(path).endswith(JSONL_SUFFIXES)


def read_file(path: Path, columns: Columns = Columns(), *, with_id: bool = False) -> Iterator[Record]:
    """A local JSONL (by its suffix) or plain-text file, read lazily."""
    try:
        with path.open("rb") as stream:
            if is_jsonl(path):
                yield from read_jsonl(stream, str(path), columns, with_id=with_id)
            else:
                yield from read_text(stream, str(path))
    except OSError as error:
        raise CorpusError(str(path), f"cannot be read: {error}") from error


def count_records(path: Path) -> int:
    """Records in a local file (non-blank lines), for progress bars and preallocated outputs."""
    with path.open("rb") as stream:
        return sum(1 for line in lines(stream) if line.strip())
