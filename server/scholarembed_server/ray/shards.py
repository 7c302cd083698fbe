"""Shards: the unit of work, of output and of resumption. Plain pyarrow; nothing here imports Ray.

A run's input rows are cut into shards once, deterministically, before anything is embedded: a
JSONL file into byte ranges of `rows_per_shard` lines, a Parquet file into runs of whole row groups.
The plan goes to `<output>/_manifest.json`; a rerun reads it back instead of planning again, so shard
k always holds the same rows. Each shard is embedded and written by one actor call, to a temporary
name that is renamed to `<output>/shard-<k>.parquet` only once the file is whole: a shard file that
exists is complete, and a rerun skips it. Every input row therefore lands in exactly one shard file,
however often a shard is retried. Shards are named by their number in the plan, never after the input
files, so no input name can look like a temporary or hidden file of the output folder.

Rows are read by the one corpus reader (`corpus`), which names a bad record by its place:
"corpus.jsonl:17" (JSONL, by line) or "corpus.parquet row 17".

Output shard columns: id (string), vector (fixed-size list of float32 or float16, or packed bits as
fixed-size binary), token_count (int32), truncated (bool). The Parquet key-value metadata key
`scholarembed` holds a JSON object: model id and source (which pins the revision), prompt templates,
dimensions and the model's full and Matryoshka dimensions, encoding, input type, and the input range.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..corpus import Columns, CorpusError, Record, check_columns, is_jsonl, lines, parse_line, read_jsonl, record
from ..errors import FailedPreconditionError

MANIFEST = "_manifest.json"
METADATA_KEY = b"scholarembed"
TEMPORARY_PREFIX = "_tmp-"


class ShardsError(FailedPreconditionError):
    """An output folder cannot be used as asked (other settings, incomplete, foreign metadata)."""


@dataclass(frozen=True)
class Shard:
    """Rows [first_row, first_row + rows) of one input file, located by byte range (JSONL, starting at line
    `first_line`) or row groups (Parquet)."""

    name: str
    path: str
    format: str  # "jsonl" or "parquet"
    first_row: int
    rows: int
    byte_start: int = 0
    byte_stop: int = 0
    row_groups: tuple[int, ...] = ()
    first_line: int = 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "row_groups": list(self.row_groups)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shard:
        return cls(**{**data, "row_groups": tuple(data.get("row_groups", ()))})


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
            raise CorpusError(source, "no such file or folder")
        if info.type == pafs.FileType.Directory:
            children = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = sorted(c.path for c in children if c.is_file and _format(c.path) and not _hidden(c.path))
            if not files:
                raise CorpusError(source, "a folder without .jsonl or .parquet files")
            found += [(fs, file, _format(file) or "") for file in files]
            continue
        kind = _format(path)
        if kind is None:
            raise CorpusError(source, "not a .jsonl or .parquet file")
        found.append((fs, path, kind))
    return found


def _format(path: str) -> str | None:
    if is_jsonl(path):
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
    row group larger than that is a shard of its own), named by their number. Checks each file's columns
    on the way."""
    if rows_per_shard < 1:
        raise CorpusError("rows_per_shard", f"must be at least 1, got {rows_per_shard}")
    shards: list[Shard] = []
    for fs, path, kind in list_inputs(sources):
        uri = uri_of(fs, path)
        shards += (
            _plan_jsonl(fs, path, uri, columns, rows_per_shard)
            if kind == "jsonl"
            else _plan_parquet(fs, path, uri, columns, rows_per_shard)
        )
    return [dataclasses.replace(shard, name=f"shard-{number:08d}") for number, shard in enumerate(shards)]


def _plan_jsonl(fs: pafs.FileSystem, path: str, uri: str, columns: Columns, rows_per_shard: int) -> list[Shard]:
    shards: list[Shard] = []
    start = offset = first_row = rows = 0
    first_line = line_number = 1
    try:
        with fs.open_input_stream(path) as stream:
            for line_number, line in enumerate(lines(stream), start=1):
                if line.strip():
                    if first_row == 0 and rows == 0:  # the first record's fields, before anything is written
                        where = f"{uri}:{line_number}"
                        record(parse_line(line, where), columns, where, with_id=True)
                    rows += 1
                offset += len(line)
                if rows == rows_per_shard:
                    shards.append(Shard("", uri, "jsonl", first_row, rows, start, offset, first_line=first_line))
                    start, first_row, rows, first_line = offset, first_row + rows, 0, line_number + 1
    except OSError as error:
        raise CorpusError(uri, f"cannot be read: {error}") from error
    if rows:
        shards.append(Shard("", uri, "jsonl", first_row, rows, start, offset, first_line=first_line))
    if not shards:
        raise CorpusError(uri, "no records")
    return shards


def _plan_parquet(fs: pafs.FileSystem, path: str, uri: str, columns: Columns, rows_per_shard: int) -> list[Shard]:
    try:
        with fs.open_input_file(path) as file:
            metadata = pq.ParquetFile(file).metadata
    except (OSError, pa.ArrowInvalid) as error:
        raise CorpusError(uri, f"cannot be read as Parquet: {error}") from error
    check_columns(metadata.schema.to_arrow_schema().names, columns, uri, with_id=True)
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
        raise CorpusError(uri, "no rows")
    return shards


def read_shard_rows(shard: Shard, columns: Columns) -> list[Record]:
    """The shard's input rows, in file order; a malformed record raises CorpusError naming its place."""
    fs, path = filesystem(shard.path)
    try:
        if shard.format == "jsonl":
            with fs.open_input_file(path) as file:
                file.seek(shard.byte_start)
                data = io.BytesIO(file.read(shard.byte_stop - shard.byte_start))
            records = list(read_jsonl(data, shard.path, columns, with_id=True, first_line=shard.first_line))
        else:
            records = _parquet_records(fs, path, shard, columns)
    except OSError as error:
        raise CorpusError(shard.path, f"cannot be read: {error}") from error
    if len(records) != shard.rows:
        raise ShardsError(
            f"input {shard.path!r} changed since the run was planned: shard {shard.name} should hold "
            f"{shard.rows} rows from row {shard.first_row}, found {len(records)}; use a new output folder"
        )
    return records


def _parquet_records(fs: pafs.FileSystem, path: str, shard: Shard, columns: Columns) -> list[Record]:
    wanted = [name for name in (columns.id or "_id", "id", columns.text, columns.title or "", "metadata") if name]
    with fs.open_input_file(path) as file:
        parquet = pq.ParquetFile(file)
        present = [name for name in dict.fromkeys(wanted) if name in parquet.schema_arrow.names]
        table = parquet.read_row_groups(list(shard.row_groups), columns=present)
    return [
        record(row, columns, f"{shard.path} row {shard.first_row + offset + 1}", with_id=True)
        for offset, row in enumerate(table.to_pylist())
    ]


# -- output ----------------------------------------------------------------------------------------


def vector_column(vectors: np.ndarray, encoding: str) -> pa.Array:
    """Vectors already in the wire layout of `encoding` (as `scholarembed.decode` reads an EmbedResponse:
    float32 or float16 rows, or packed sign bits as uint8) as the shard's vector column: a fixed-size list
    of floats, or fixed-size binary."""
    if encoding == "binary":
        return pa.array([row.tobytes() for row in vectors], type=pa.binary(vectors.shape[1]))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors).reshape(-1)), vectors.shape[1])


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
