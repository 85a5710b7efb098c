"""Cut text metadata parts (csv, tsv, jsonl, and their .gz) into img2dataset's shards without reading a whole part.

img2dataset reads a whole text part into memory to cut it into shards of S rows. We scan each part once, streaming
(`text_scan`), and store an index beside the metadata shards: the decompressed byte offset of every shard's first row,
the column names (the first non-empty csv/tsv line, unless given: CC12M's TSV has none) and the Arrow types inferred
once for the part. Shard k then reads only `[offsets[k], offsets[k+1])`, parses it with those names and types, so
every shard of a part has the same schema, and checks that pyarrow parsed exactly the rows the index promised.

By design, unlike a whole-file pyarrow read: types come from the first block (about 4 MB) and are then fixed, so a
later value that does not fit (a float in a column of ints, a string in a column of numbers, a jsonl key absent from
the first block) is a `SchemaError` naming the file, the shard and the column, where a whole-file read would widen the
type; a column with only nulls in the first block is read as string. A quoted field holding a line break makes
pyarrow's default (`newlines_in_values=False`) whole-file read fail past its first 1 MB block; we record whether the
part has one and then read with `newlines_in_values=True`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from laion_vq.shards.metadata import ShardOutOfRange
from laion_vq.shards.schema import SchemaError
from laion_vq.shards.storage import exists, filesystem, publish_bytes, read_bytes
from laion_vq.shards.text_scan import CHUNK_BYTES, RowScanner, TextFormatError, open_stream
from laion_vq.shards.text_scan import MAX_ROW_BYTES as MAX_ROW_BYTES  # re-exported: the scan's public limit

CSV_FORMATS = ("csv", "csv.gz", "tsv", "tsv.gz")
JSONL_FORMATS = ("jsonl", "jsonl.gz")
TEXT_INPUT_FORMATS = CSV_FORMATS + JSONL_FORMATS

#: Bump when the index's meaning changes: an index of another version is rebuilt, never trusted.
INDEX_VERSION = 1
#: Bytes of whole rows at the start of a part that pyarrow infers the stored column types from.
INFER_BYTES = 4 << 20

_CSV_COLUMN_ERROR = re.compile(r"In CSV column #(\d+)")
_JSON_COLUMN_ERROR = re.compile(r"Column\(/([^)]*)\)")


class StaleIndexError(RuntimeError):
    """The part changed (size, mtime or etag) since it was indexed: rebuild the index, never read with it."""


@dataclass(frozen=True)
class TextPartIndex:
    """Where each shard of one text part starts, and the names and types every shard is read with."""

    url: str
    input_format: str
    samples_per_shard: int
    num_rows: int
    #: decompressed byte offset of each shard's first row, then the end of the stream: len = num_shards + 1
    offsets: tuple[int, ...]
    columns: tuple[str, ...]
    schema: pa.Schema
    #: whether the part's first line holds the column names (False: they were given, the first line is data)
    header: bool
    #: the file's identity when it was indexed (fsspec `info`): a change means re-index, never misread
    size: int
    mtime: float | None
    etag: str | None
    #: csv/tsv: some quoted field holds a line break, so shards are parsed with `newlines_in_values=True`
    newlines_in_values: bool = False

    def __post_init__(self) -> None:
        if self.input_format not in TEXT_INPUT_FORMATS:
            raise ValueError(f"input format {self.input_format!r} is not one of {TEXT_INPUT_FORMATS}")
        expected = math.ceil(self.num_rows / self.samples_per_shard) + 1
        if len(self.offsets) != expected:
            raise ValueError(f"{self.url}: {len(self.offsets)} offsets for {self.num_rows} rows, expected {expected}")

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    @property
    def is_jsonl(self) -> bool:
        return self.input_format in JSONL_FORMATS

    @property
    def delimiter(self) -> str:
        return "\t" if self.input_format.startswith("tsv") else ","

    @property
    def gzipped(self) -> bool:
        return self.input_format.endswith(".gz")

    def shard_rows(self, shard_in_part: int) -> int:
        """Rows in local shard `shard_in_part`: S, or fewer for the part's last shard."""
        start = shard_in_part * self.samples_per_shard
        return min(self.samples_per_shard, self.num_rows - start)

    def identity(self) -> tuple[int, float | None, str | None]:
        return self.size, self.mtime, self.etag

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": INDEX_VERSION,
                "url": self.url,
                "input_format": self.input_format,
                "samples_per_shard": self.samples_per_shard,
                "num_rows": self.num_rows,
                "header": self.header,
                "columns": list(self.columns),
                # readable copy of the types; `schema` (Arrow IPC, base64) is the one that is read back
                "types": [str(field.type) for field in self.schema],
                "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
                "newlines_in_values": self.newlines_in_values,
                "size": self.size,
                "mtime": self.mtime,
                "etag": self.etag,
                "offsets": list(self.offsets),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> TextPartIndex:
        """The index `to_json` wrote; a ValueError when it is of another version or malformed."""
        data = json.loads(text)
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"text index version {data.get('version')!r}, this code reads {INDEX_VERSION}")
        try:
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["schema"])))
            return cls(
                url=data["url"],
                input_format=data["input_format"],
                samples_per_shard=int(data["samples_per_shard"]),
                num_rows=int(data["num_rows"]),
                offsets=tuple(int(o) for o in data["offsets"]),
                columns=tuple(data["columns"]),
                schema=schema,
                header=bool(data["header"]),
                size=int(data["size"]),
                mtime=data["mtime"],
                etag=data["etag"],
                newlines_in_values=bool(data["newlines_in_values"]),
            )
        except (KeyError, TypeError, pa.ArrowInvalid) as err:
            raise ValueError(f"malformed text index: {err}") from err


# ------------------------------------------------------------------------------------------------------------ identity


def _file_identity(fs: Any, path: str) -> tuple[int, float | None, str | None]:
    """(size, mtime, etag) from fsspec `info`, never from a cached listing: local files have `mtime`, object stores
    `ETag`/`LastModified`."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(mtime, datetime):
        mtime = mtime.timestamp()
    etag = info.get("ETag", info.get("etag"))
    return int(info["size"]), (float(mtime) if mtime is not None else None), (str(etag) if etag is not None else None)


# ---------------------------------------------------------------------------------------------------------- inference


def _widen_nulls(schema: pa.Schema) -> pa.Schema:
    """A column with only nulls in the sample gets type null; read it as string so later values fit."""
    return pa.schema([field.with_type(pa.string()) if pa.types.is_null(field.type) else field for field in schema])


def _infer_schema(
    url: str, sample: bytes, jsonl: bool, delimiter: str, column_names: Sequence[str] | None
) -> pa.Schema:
    try:
        if jsonl:
            if not sample.strip():
                return pa.schema([])
            table = pajson.read_json(pa.BufferReader(sample))
        else:
            if not sample.strip(b"\r\n"):
                return pa.schema([(name, pa.string()) for name in column_names or ()])
            if not sample.endswith((b"\n", b"\r")):
                sample += b"\n"  # pyarrow reads a lone header without a line end as an empty file
            table = pacsv.read_csv(
                pa.BufferReader(sample),
                read_options=pacsv.ReadOptions(column_names=list(column_names) if column_names else None),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            )
    except pa.ArrowInvalid as err:
        raise SchemaError(f"{url}: cannot read the column types from the first rows: {err}") from err
    return _widen_nulls(table.schema)


# ---------------------------------------------------------------------------------------------------------------- index


def index_text_part(
    url: str, input_format: str, samples_per_shard: int, *, column_names: Sequence[str] | None = None
) -> TextPartIndex:
    """Scan the part once (`RowScanner`, streaming in chunks of CHUNK_BYTES), and return where each shard's rows start.

    `column_names` is for a part without a header line (its first line is then data). An empty part, or one
    with only a header, indexes as 0 rows and 0 shards.
    """
    if input_format not in TEXT_INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {TEXT_INPUT_FORMATS}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}")
    jsonl = input_format in JSONL_FORMATS
    if jsonl and column_names is not None:
        raise ValueError("jsonl rows name their own fields: column_names applies to csv/tsv without a header")
    header = column_names is None and not jsonl
    delimiter = "\t" if input_format.startswith("tsv") else ","
    fs, path = filesystem(url)
    identity = _file_identity(fs, path)

    scanner = RowScanner(url, jsonl, delimiter, CHUNK_BYTES)  # read here at call time: one knob for scan and read
    offsets: list[int] = []
    num_rows = 0
    header_pending = header
    sample_parts: list[bytes] = []
    sample_end: int | None = None
    with open_stream(fs, path, input_format) as stream:
        for starts, rows_bytes in scanner.rows(stream):
            if sample_end is None:
                sample_parts.append(bytes(rows_bytes))
                reached = starts[starts >= INFER_BYTES]
                if len(reached):
                    sample_end = int(reached[0])
            if header_pending and len(starts):
                starts = starts[1:]
                header_pending = False
            offsets.extend(starts[(-num_rows) % samples_per_shard :: samples_per_shard].tolist())
            num_rows += len(starts)
    offsets.append(scanner.total)
    if _file_identity(fs, path) != identity:
        raise StaleIndexError(f"{url} changed while it was being indexed")

    sample = b"".join(sample_parts)
    if sample_end is not None:
        sample = sample[:sample_end]
    schema = _infer_schema(url, sample, jsonl, delimiter, column_names)
    names = tuple(schema.names)
    if len(set(names)) != len(names):
        raise TextFormatError(f"{url}: duplicate column names {list(names)}")
    size, mtime, etag = identity
    return TextPartIndex(
        url=url,
        input_format=input_format,
        samples_per_shard=samples_per_shard,
        num_rows=num_rows,
        offsets=tuple(offsets),
        columns=names,
        schema=schema,
        header=header,
        size=size,
        mtime=mtime,
        etag=etag,
        newlines_in_values=scanner.quoted_line_breaks,
    )


def index_file_name(url: str, samples_per_shard: int) -> str:
    """`<sha256 of the url, 16 hex>-S<samples>.json`. The way of reading (format, column names) is checked inside
    the index, so a reader that knows only the url and S (`load_index`) finds it."""
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-S{samples_per_shard}.json"


def load_index(
    url: str,
    input_format: str,
    samples_per_shard: int,
    index_dir: str,
    *,
    column_names: Sequence[str] | None = None,
) -> TextPartIndex | None:
    """The stored index of the part, or None when there is none usable: missing, unreadable (another version),
    made for another format or other given column names, or the part changed since (size, mtime, etag)."""
    dest = f"{index_dir.rstrip('/')}/{index_file_name(url, samples_per_shard)}"
    if not exists(dest):
        return None
    try:
        stored = TextPartIndex.from_json(read_bytes(dest))
    except ValueError:
        return None
    fs, path = filesystem(url)
    if (
        stored.url != url
        or stored.input_format != input_format
        or stored.samples_per_shard != samples_per_shard
        or (column_names is not None and (stored.header or stored.columns != tuple(column_names)))
        or stored.identity() != _file_identity(fs, path)
    ):
        return None
    return stored


def load_or_build_index(
    url: str,
    input_format: str,
    samples_per_shard: int,
    index_dir: str,
    *,
    column_names: Sequence[str] | None = None,
) -> TextPartIndex:
    """The part's index from `index_dir` (a local path or fsspec URL) when the part is unchanged, else built and
    published there (atomically) for every later read."""
    stored = load_index(url, input_format, samples_per_shard, index_dir, column_names=column_names)
    wanted_header = column_names is None and input_format not in JSONL_FORMATS
    if stored is not None and stored.header == wanted_header:
        return stored
    index = index_text_part(url, input_format, samples_per_shard, column_names=column_names)
    publish_bytes(index.to_json().encode(), f"{index_dir.rstrip('/')}/{index_file_name(url, samples_per_shard)}")
    return index


# ----------------------------------------------------------------------------------------------------------------- read


def _read_range(fs: Any, path: str, index: TextPartIndex, start: int, stop: int) -> bytes:
    if not index.gzipped:
        return fs.cat_file(path, start=start, end=stop)
    with open_stream(fs, path, index.input_format) as stream:
        skip = start
        while skip > 0:
            got = len(stream.read(min(skip, CHUNK_BYTES)))
            if not got:
                break
            skip -= got
        return stream.read(stop - start)


def _parse(index: TextPartIndex, data: bytes) -> pa.Table:
    if index.is_jsonl:
        return pajson.read_json(
            pa.BufferReader(data),
            parse_options=pajson.ParseOptions(explicit_schema=index.schema, unexpected_field_behavior="error"),
        )
    return pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(column_names=list(index.columns)),
        parse_options=pacsv.ParseOptions(delimiter=index.delimiter, newlines_in_values=index.newlines_in_values),
        convert_options=pacsv.ConvertOptions(column_types={field.name: field.type for field in index.schema}),
    )


def _culprit(index: TextPartIndex, data: bytes, err: pa.ArrowInvalid) -> str | None:
    """The column a failed parse choked on: from pyarrow's message, else by re-reading with inferred types."""
    message = str(err)
    if match := _CSV_COLUMN_ERROR.search(message):
        number = int(match.group(1))
        return index.columns[number] if number < len(index.columns) else None
    if match := _JSON_COLUMN_ERROR.search(message):
        return match.group(1).split("/")[0]
    try:
        if index.is_jsonl:
            loose = pajson.read_json(pa.BufferReader(data))
        else:
            loose = pacsv.read_csv(
                pa.BufferReader(data),
                read_options=pacsv.ReadOptions(column_names=list(index.columns)),
                parse_options=pacsv.ParseOptions(delimiter=index.delimiter, newlines_in_values=True),
            )
    except pa.ArrowInvalid:
        return None
    for name in loose.column_names:
        if name not in index.columns:
            return name
        try:
            loose.column(name).cast(index.schema.field(name).type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return name
    return None


def read_text_rows(index: TextPartIndex, shard_in_part: int) -> pa.Table:
    """The rows of local shard `shard_in_part` of the indexed part, with the stored names and types.

    A plain part is read only in `[offsets[k], offsets[k+1])` (one ranged read). A .gz part cannot be entered
    mid-stream: it is decompressed from the start, streaming in chunks, and only that range is kept. A value that
    does not fit the stored type is a SchemaError naming the file, the shard and the column.
    """
    if not 0 <= shard_in_part < index.num_shards:
        raise ShardOutOfRange(
            f"{index.url}: local shard {shard_in_part} is beyond the part, which holds {index.num_rows} rows in "
            f"{index.num_shards} shard(s) of {index.samples_per_shard}"
        )
    fs, path = filesystem(index.url)
    if _file_identity(fs, path) != index.identity():
        raise StaleIndexError(f"{index.url} changed since it was indexed: rebuild its index (load_or_build_index)")
    start, stop = index.offsets[shard_in_part], index.offsets[shard_in_part + 1]
    data = _read_range(fs, path, index, start, stop)
    where = f"{index.url} (local shard {shard_in_part}, bytes {start}…{stop})"
    if len(data) != stop - start:
        raise StaleIndexError(f"{where}: read {len(data)} bytes, the index expects {stop - start}")
    try:
        table = _parse(index, data)
    except pa.ArrowInvalid as err:
        column = _culprit(index, data, err)
        if column is None:
            raise SchemaError(f"{where}: {err}") from err
        expected = index.schema.field(column).type if column in index.columns else "absent from the first rows"
        raise SchemaError(f"{where}: column {column!r} holds a value that does not fit {expected}: {err}") from err
    if table.num_rows != index.shard_rows(shard_in_part):
        raise TextFormatError(
            f"{where}: pyarrow parsed {table.num_rows} rows where the index expects {index.shard_rows(shard_in_part)}"
        )
    return table
