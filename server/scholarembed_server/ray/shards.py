"""Shards: the unit of work, of output and of resumption. Plain pyarrow; nothing here imports Ray.

A run's input rows are cut into shards once, deterministically, before anything is embedded: a
JSONL file into byte ranges of `rows_per_shard` lines, a Parquet file into runs of whole row groups.
The plan goes to `<output>/_manifest.json`; a rerun reads it back instead of planning again, so shard
k always holds the same rows. Each shard is embedded and written by one actor call, to a temporary
name that is renamed to `<output>/<shard>.parquet` only once the file is whole: a shard file that
exists is complete, and a rerun skips it. Every input row therefore lands in exactly one shard file,
however often a shard is retried.

Output shard columns: id (string), vector (fixed-size list of float32 or float16, or packed bits as
fixed-size binary), token_count (int32), truncated (bool). The Parquet key-value metadata key
`scholarembed` holds a JSON object: model id and source (which pins the revision), prompt templates,
dimensions and the model's full and Matryoshka dimensions, encoding, input type, and the input range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
METADATA_KEY = b"scholarembed"
TEMPORARY_PREFIX = "_tmp-"
ENCODINGS = ("float32", "float16", "binary")
ID_FIELDS = ("_id", "id")  # BEIR writes _id; either is accepted
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class CorpusError(ValueError):
    """The corpus cannot be read as asked (missing file or column, bad line); names the place."""


class ShardsError(ValueError):
    """An output folder cannot be used as asked (other settings, incomplete, foreign metadata)."""


@dataclass(frozen=True)
class Columns:
    """Which input fields hold what; `id` None means `_id`, else `id`."""

    text: str = "text"
    title: str | None = "title"
    id: str | None = None


@dataclass(frozen=True)
class Shard:
    """Rows [first_row, first_row + rows) of one input file, located by byte range (JSONL) or row groups."""

    name: str
    path: str
    format: str  # "jsonl" or "parquet"
    first_row: int
    rows: int
    byte_start: int = 0
    byte_stop: int = 0
    row_groups: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "row_groups": list(self.row_groups)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shard:
        return cls(**{**data, "row_groups": tuple(data.get("row_groups", ()))})


@dataclass
class CorpusRows:
    ids: list[str]
    texts: list[str]
    titles: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)  # BEIR's per-record "metadata" object


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path in it) for a local path or any URI pyarrow knows (s3://, gs://, hdfs://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def list_inputs(sources: Sequence[str]) -> list[tuple[pafs.FileSystem, str, str]]:
    """(filesystem, path, format) per input file, sorted; a folder contributes its .jsonl and .parquet files."""
    found: list[tuple[pafs.FileSystem, str, str]] = []
    for source in sources:
        fs, path = filesystem(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"input {source!r}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            children = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(c.path for c in children if c.is_file and _format(c.path) and not _hidden(c.path))
            if not files:
                raise CorpusError(f"input {source!r}: a folder without .jsonl or .parquet files")
            found += [(fs, file, _format(file) or "") for file in files]
            continue
        kind = _format(path)
        if kind is None:
            raise CorpusError(f"input {source!r}: not a .jsonl or .parquet file")
        found.append((fs, path, kind))
    return found


def _format(path: str) -> str | None:
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return None


def _hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """A string that `filesystem()` turns back into (fs, path), for the manifest and the actors."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def plan_shards(sources: Sequence[str], columns: Columns, rows_per_shard: int) -> list[Shard]:
    """Cut every input file into shards of at most `rows_per_shard` rows (Parquet: whole row groups, so a
    row group larger than that is a shard of its own). Checks each file's columns on the way."""
    if rows_per_shard < 1:
        raise CorpusError(f"rows_per_shard: must be at least 1, got {rows_per_shard}")
    shards: list[Shard] = []
    for fs, path, kind in list_inputs(sources):
        uri = uri_of(fs, path)
        stem = posixpath.basename(path).rsplit(".", 1)[0][:40]
        # The path's hash keeps names apart when two folders hold files of the same name.
        prefix = f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"
        planned = (
            _plan_jsonl(fs, path, uri, columns, rows_per_shard)
            if kind == "jsonl"
            else _plan_parquet(fs, path, uri, columns, rows_per_shard)
        )
        shards += [dataclasses.replace(s, name=f"{prefix}-{s.first_row:012d}") for s in planned]
    return shards


def _plan_jsonl(fs: pafs.FileSystem, path: str, uri: str, columns: Columns, rows_per_shard: int) -> list[Shard]:
    shards: list[Shard] = []
    start = offset = first_row = rows = 0
    try:
        with fs.open_input_stream(path) as stream:
            for line in _lines(stream):
                if line.strip():
                    if first_row == 0 and rows == 0:
                        _check_record(_parse(line, uri, 1), columns, f"{uri}:1")
                    rows += 1
                offset += len(line)
                if rows == rows_per_shard:
                    shards.append(Shard("", uri, "jsonl", first_row, rows, start, offset))
                    start, first_row, rows = offset, first_row + rows, 0
    except OSError as error:
        raise CorpusError(f"input {uri!r} cannot be read: {error}") from error
    if rows:
        shards.append(Shard("", uri, "jsonl", first_row, rows, start, offset))
    if not shards:
        raise CorpusError(f"input {uri!r}: no records")
    return shards


def _lines(stream: Any, chunk_bytes: int = 1 << 22) -> Iterator[bytes]:
    """Lines of a binary stream, newline kept, so byte offsets add up."""
    rest = b""
    while chunk := stream.read(chunk_bytes):
        rest += chunk
        *complete, rest = rest.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if rest:
        yield rest


def _parse(line: bytes, uri: str, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorpusError(f"{uri}:{line_number}: not a JSON object: {error}") from error
    if not isinstance(record, dict):
        raise CorpusError(f"{uri}:{line_number}: not a JSON object")
    return record


def _check_record(record: dict[str, Any], columns: Columns, where: str) -> None:
    id_fields = (columns.id,) if columns.id else ID_FIELDS
    if not any(name in record for name in id_fields):
        raise CorpusError(f"{where}: no {' or '.join(map(repr, id_fields))} field")
    if columns.text not in record:
        raise CorpusError(f"{where}: no {columns.text!r} field")


def _plan_parquet(fs: pafs.FileSystem, path: str, uri: str, columns: Columns, rows_per_shard: int) -> list[Shard]:
    try:
        with fs.open_input_file(path) as file:
            metadata = pq.ParquetFile(file).metadata
    except (OSError, pa.ArrowInvalid) as error:
        raise CorpusError(f"input {uri!r} cannot be read as Parquet: {error}") from error
    names = set(metadata.schema.to_arrow_schema().names)
    _check_record(dict.fromkeys(names), columns, f"input {uri!r}")
    shards: list[Shard] = []
    groups: list[int] = []
    first_row = rows = 0
    for group in range(metadata.num_row_groups):
        group_rows = metadata.row_group(group).num_rows
        if groups and rows + group_rows > rows_per_shard:
            shards.append(Shard("", uri, "parquet", first_row, rows, row_groups=tuple(groups)))
            first_row, rows, groups = first_row + rows, 0, []
        groups.append(group)
        rows += group_rows
    if rows:
        shards.append(Shard("", uri, "parquet", first_row, rows, row_groups=tuple(groups)))
    if not shards:
        raise CorpusError(f"input {uri!r}: no rows")
    return shards


def read_shard_rows(shard: Shard, columns: Columns) -> CorpusRows:
    """The shard's input rows, in file order; a missing field or an empty text raises CorpusError naming it."""
    fs, path = filesystem(shard.path)
    try:
        records = (
            _jsonl_records(fs, path, shard, columns)
            if shard.format == "jsonl"
            else _parquet_records(fs, path, shard, columns)
        )
    except OSError as error:
        raise CorpusError(f"input {shard.path!r} cannot be read: {error}") from error
    if len(records.ids) != shard.rows:
        raise CorpusError(
            f"input {shard.path!r} changed since the run was planned: shard {shard.name} should hold "
            f"{shard.rows} rows from row {shard.first_row}, found {len(records.ids)}; use a new output folder"
        )
    return records


def _jsonl_records(fs: pafs.FileSystem, path: str, shard: Shard, columns: Columns) -> CorpusRows:
    with fs.open_input_file(path) as file:
        file.seek(shard.byte_start)
        data = file.read(shard.byte_stop - shard.byte_start)
    rows = CorpusRows([], [])
    row = shard.first_row
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        row += 1
        where = f"{shard.path} record {row}"
        record = _parse(line, shard.path, row)
        _check_record(record, columns, where)
        _append(rows, record, columns, where)
    return rows


def _parquet_records(fs: pafs.FileSystem, path: str, shard: Shard, columns: Columns) -> CorpusRows:
    wanted = [name for name in (columns.id or "", *ID_FIELDS, columns.text, columns.title or "", "metadata") if name]
    with fs.open_input_file(path) as file:
        parquet = pq.ParquetFile(file)
        present = [name for name in dict.fromkeys(wanted) if name in parquet.schema_arrow.names]
        table = parquet.read_row_groups(list(shard.row_groups), columns=present)
    rows = CorpusRows([], [])
    for offset, record in enumerate(table.to_pylist()):
        where = f"{shard.path} row {shard.first_row + offset + 1}"
        _append(rows, record, columns, where)
    return rows


def _append(rows: CorpusRows, record: dict[str, Any], columns: Columns, where: str) -> None:
    id_field = columns.id or next(name for name in ID_FIELDS if name in record)
    identifier, text = record.get(id_field), record.get(columns.text)
    if identifier is None or str(identifier) == "":
        raise CorpusError(f"{where}: empty {id_field!r}")
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f"{where}: {columns.text!r} must be a non-empty string")
    rows.ids.append(str(identifier))
    rows.texts.append(text)
    title = record.get(columns.title) if columns.title else None
    rows.titles.append(str(title) if title else "")
    extra = record.get("metadata")
    rows.metadata.append({str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {})


# -- output ----------------------------------------------------------------------------------------


def vector_column(vectors: np.ndarray, encoding: str) -> pa.Array:
    """(n, d) float32 unit vectors as the shard's vector column in `encoding`."""
    if encoding == "binary":
        packed = np.packbits(vectors > 0, axis=1)  # MSB first, as the gRPC ENCODING_BINARY layout
        return pa.array([row.tobytes() for row in packed], type=pa.binary(packed.shape[1]))
    dtype = np.float16 if encoding == "float16" else np.float32
    values = pa.array(np.ascontiguousarray(vectors, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])


def write_shard(
    output: str,
    shard: Shard,
    ids: Sequence[str],
    vectors: np.ndarray,
    token_counts: Sequence[int],
    truncated: Sequence[bool],
    metadata: dict[str, Any],
) -> str:
    """Write the shard to a temporary file and rename it into place: the final name appears whole or
    not at all. Returns the final path."""
    fs, folder = filesystem(output)
    table = pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "vector": vector_column(vectors, metadata["encoding"]),
            "token_count": pa.array(token_counts, pa.int32()),
            "truncated": pa.array(truncated, pa.bool_()),
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps({**metadata, "shard": shard.to_json()}).encode()})
    final = f"{folder}/{shard.name}.parquet"
    # A name of its own per attempt: a retried shard never writes into another attempt's file.
    temporary = f"{folder}/{TEMPORARY_PREFIX}{shard.name}-{uuid.uuid4().hex}.parquet"
    pq.write_table(table, temporary, filesystem=fs)
    fs.move(temporary, final)
    return final


def completed_shards(output: str) -> set[str]:
    """Names of the shards whose final file exists."""
    fs, folder = filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return {
        posixpath.basename(i.path).removesuffix(".parquet")
        for i in infos
        if i.is_file and i.path.endswith(".parquet") and not posixpath.basename(i.path).startswith("_")
    }


def remove_temporary_files(output: str) -> int:
    """Delete what interrupted attempts left; they were never complete."""
    fs, folder = filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    leftovers = [i.path for i in infos if posixpath.basename(i.path).startswith(TEMPORARY_PREFIX)]
    for path in leftovers:
        fs.delete_file(path)
    return len(leftovers)


def write_json(output: str, name: str, data: dict[str, Any]) -> None:
    """Write `<output>/<name>` through a temporary file and a rename."""
    fs, folder = filesystem(output)
    fs.create_dir(folder, recursive=True)
    temporary = f"{folder}/{TEMPORARY_PREFIX}{name}-{uuid.uuid4().hex}"
    with fs.open_output_stream(temporary) as stream:
        stream.write(json.dumps(data, indent=1).encode())
    fs.move(temporary, f"{folder}/{name}")


def read_json(output: str, name: str) -> dict[str, Any] | None:
    fs, folder = filesystem(output)
    if fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{folder}/{name}") as stream:
        data: dict[str, Any] = json.loads(stream.read())
    return data


@dataclass(frozen=True)
class ShardFile:
    """One written shard, read back: its rows and the run's metadata."""

    ids: list[str]
    vectors: np.ndarray  # (n, d) float32 for float encodings; (n, d / 8) uint8 packed bits for binary
    token_counts: np.ndarray
    truncated: np.ndarray
    metadata: dict[str, Any]


def read_shard_metadata(output: str, name: str) -> dict[str, Any]:
    fs, folder = filesystem(output)
    with fs.open_input_file(f"{folder}/{name}.parquet") as file:
        schema = pq.read_schema(file)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardsError(f"{output}/{name}.parquet: not a scholarembed shard (no {METADATA_KEY.decode()!r} metadata)")
    data: dict[str, Any] = json.loads(raw)
    return data


def read_shard(output: str, name: str) -> ShardFile:
    fs, folder = filesystem(output)
    table = pq.read_table(f"{folder}/{name}.parquet", filesystem=fs)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardsError(f"{output}/{name}.parquet: not a scholarembed shard (no {METADATA_KEY.decode()!r} metadata)")
    metadata = json.loads(raw)
    column = table.column("vector").combine_chunks()
    if metadata["encoding"] == "binary":
        width = column.type.byte_width
        vectors = np.frombuffer(column.buffers()[1], dtype=np.uint8)[: len(column) * width].reshape(-1, width)
    else:
        vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(np.float32)
    return ShardFile(
        ids=table.column("id").to_pylist(),
        vectors=vectors,
        token_counts=table.column("token_count").to_numpy(),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        metadata=metadata,
    )
