"""Cut image-text metadata into shards the way img2dataset numbers them, reading only what a shard needs.

img2dataset sorts the part files, cuts each part on its own into `ceil(rows / S)` shards (the last one
partial) and keeps counting into the next part. We reproduce that numbering from the parquet footers
alone (row counts and row-group sizes), then read just the row groups that overlap one shard: a shard
of a 1 GB part costs one or two row groups, not the part. A text part (CSV/TSV/JSON lines) is indexed once
(`text_index`: the byte offset of each shard's first row, stored beside the metadata shards) and then read
the same way: only its shard's bytes.

Every column of the source is kept with its type. A LAION-400M part keeps exactly LAION's columns and types
first (`LAION_SCHEMA`, the seed dataset's layout), then anything else it carries.
"""

from __future__ import annotations

import bisect
import glob as globlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.schema import LAION_SCHEMA, SchemaError, conform_laion_table
from laion_vq.shards.sources import DEFAULT_PRESET, PARQUET, SourceFormat, preset
from laion_vq.shards.storage import filesystem

if TYPE_CHECKING:  # at run time imported where used: text_index imports this module
    from laion_vq.shards.text_index import TextPartIndex

#: The key of our record in a metadata shard's parquet key-value metadata.
SHARD_SOURCE_KEY = b"laion_vq"


@dataclass(frozen=True)
class ShardSource:
    """How a stored metadata shard is read by the download stage: written by this stage, read back there."""

    format: str = DEFAULT_PRESET
    url_column: str = "URL"
    caption_column: str = "TEXT"
    hash_column: str | None = None
    hash_type: str | None = None
    #: the predicate rows had to pass (None: none), and the rows (0-based, = the sample index) it rejected
    filter: str | None = None
    filtered_rows: tuple[int, ...] = field(default=())

    @classmethod
    def of(cls, fmt: SourceFormat, row_filter: str | None, filtered_rows: tuple[int, ...] = ()) -> ShardSource:
        return cls(
            format=fmt.name,
            url_column=fmt.url_column,
            caption_column=fmt.caption_column,
            hash_column=fmt.hash_column,
            hash_type=fmt.hash_type,
            filter=row_filter or None,
            filtered_rows=filtered_rows,
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> ShardSource:
        """The record of a stored shard; a shard stored before sources had a format is LAION-400M's."""
        raw = (schema.metadata or {}).get(SHARD_SOURCE_KEY)
        if not raw:
            return cls()
        data = json.loads(raw)
        data["filtered_rows"] = tuple(data.get("filtered_rows") or ())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class ShardOutOfRange(ValueError):
    """A shard id past the end of the metadata."""


@dataclass(frozen=True)
class PartFile:
    """One metadata part: its path (fsspec URL), row count and row-group sizes, from the footer."""

    url: str
    num_rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class ShardSlice:
    """Where shard `shard_id` lives: rows `[start, stop)` of `part`."""

    shard_id: int
    part: PartFile
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def resolve_parts(source: str, input_format: str = PARQUET) -> list[str]:
    """Part files for one file, a folder of parts (`*.<input_format>`, as img2dataset globs) or a glob, sorted
    as img2dataset sorts them."""
    fs, path = filesystem(source)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if globlib.has_magic(path):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(fs.glob(path.rstrip("/") + f"/*.{input_format}"))
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"metadata source {source!r} does not exist")
    if not paths:
        raise FileNotFoundError(f"metadata source {source!r} matches no {input_format} files")
    return [prefix + p for p in paths]


def read_footer(url: str) -> PartFile:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"{url}: not a readable parquet file: {err}") from err
    return PartFile(
        url=url,
        num_rows=meta.num_rows,
        row_group_rows=tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
        columns=tuple(meta.schema.to_arrow_schema().names),
    )


class NotIndexed(LookupError):
    """A text source whose row-offset index has not been built yet (and the caller asked not to build it)."""


class LaionMetadata:
    """The metadata parts behind one source, indexed into shards of `samples_per_shard` rows.

    `source_format` says which columns hold URL and caption and the file format (default: LAION-400M parquet);
    `index_dir` is where text parts' row-offset indexes live (the storage's `metadata/_index`); with
    `build_index=False` a text part without an index raises NotIndexed instead of being scanned."""

    def __init__(
        self,
        source: str,
        samples_per_shard: int,
        source_format: SourceFormat | None = None,
        index_dir: str | None = None,
        build_index: bool = True,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}")
        self.source = source
        self.samples_per_shard = samples_per_shard
        self.format = source_format or preset(DEFAULT_PRESET)
        self.index_dir = index_dir
        self.build_index = build_index
        self._text_indexes: dict[str, TextPartIndex] = {}

    @cached_property
    def parts(self) -> list[PartFile]:
        urls = resolve_parts(self.source, self.format.input_format)
        if self.format.input_format == PARQUET:
            return [read_footer(url) for url in urls]
        return [self._text_part(url) for url in urls]

    def _text_part(self, url: str) -> PartFile:
        from laion_vq.shards import text_index

        if self.index_dir is None:
            raise ValueError(f"{url}: a {self.format.input_format} source needs an index folder (index_dir)")
        names = None if self.format.header else list(self.format.column_names)
        if not self.build_index:
            index = text_index.load_index(url, self.format.input_format, self.samples_per_shard, self.index_dir)
            if index is None:
                raise NotIndexed(f"{url} has no row-offset index yet: the metadata step builds it")
        else:
            index = text_index.load_or_build_index(
                url, self.format.input_format, self.samples_per_shard, self.index_dir, column_names=names
            )
        self._text_indexes[url] = index
        return PartFile(url=url, num_rows=index.num_rows, row_group_rows=(), columns=tuple(index.schema.names))

    @cached_property
    def _first_shard_of_part(self) -> list[int]:
        firsts, total = [], 0
        for part in self.parts:
            firsts.append(total)
            total += math.ceil(part.num_rows / self.samples_per_shard)
        firsts.append(total)
        return firsts

    @property
    def num_shards(self) -> int:
        return self._first_shard_of_part[-1]

    @property
    def num_rows(self) -> int:
        return sum(part.num_rows for part in self.parts)

    def locate(self, shard_id: int) -> ShardSlice:
        if not 0 <= shard_id < self.num_shards:
            raise ShardOutOfRange(
                f"shard {shard_id:05d} is beyond the metadata: {self.source!r} holds {self.num_rows} rows in "
                f"{len(self.parts)} part file(s), which make {self.num_shards} shard(s) "
                f"(00000 … {self.num_shards - 1:05d}) of {self.samples_per_shard} samples"
            )
        part_index = bisect.bisect_right(self._first_shard_of_part, shard_id) - 1
        part = self.parts[part_index]
        local = shard_id - self._first_shard_of_part[part_index]
        start = local * self.samples_per_shard
        return ShardSlice(shard_id, part, start, min(start + self.samples_per_shard, part.num_rows))

    def read_shard(self, shard_id: int) -> pa.Table:
        """The shard's rows, every column of the source with its type, reading only the shard's rows."""
        where = self.locate(shard_id)
        part = where.part
        url_column, caption_column = self.format.url_column, self.format.caption_column
        missing = [c for c in (url_column, caption_column) if c not in part.columns]
        if missing:
            raise SchemaError(
                f"{part.url}: missing the URL/caption column(s) {missing} of metadata format {self.format.name!r}; "
                f"columns present: {list(part.columns)} (set LAION_VQ_METADATA_FORMAT, or LAION_VQ_URL_COLUMN and "
                "LAION_VQ_CAPTION_COLUMN)"
            )
        if self.format.input_format == PARQUET:
            table = self._read_parquet_rows(where)
        else:
            from laion_vq.shards import text_index

            index = self._text_indexes[part.url]
            local = where.start // self.samples_per_shard
            table = text_index.read_text_rows(index, local)
            if table.num_rows != where.num_rows:
                raise SchemaError(
                    f"{part.url} (shard {shard_id:05d}): read {table.num_rows} rows where its index says "
                    f"{where.num_rows}: the file changed since it was indexed"
                )
        source = f"{part.url} (shard {shard_id:05d})"
        url_type = table.schema.field(url_column).type
        if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
            raise SchemaError(f"{source}: URL column {url_column!r} must hold strings, got {url_type}")
        if self.format.name == DEFAULT_PRESET and (url_column, caption_column) == ("URL", "TEXT"):
            # the seed dataset's layout: LAION's columns and types first, then whatever else the part holds
            rest = [name for name in table.column_names if name not in LAION_SCHEMA.names]
            laion = conform_laion_table(table, source)
            return pa.Table.from_arrays(
                [*laion.columns, *(table.column(n) for n in rest)], names=[*laion.column_names, *rest]
            )
        return table

    def _read_parquet_rows(self, where: ShardSlice) -> pa.Table:
        part = where.part
        groups, offset, first_row = [], 0, None
        for index, rows in enumerate(part.row_group_rows):
            if offset < where.stop and offset + rows > where.start:
                groups.append(index)
                if first_row is None:
                    first_row = offset
            offset += rows
        fs, path = filesystem(part.url)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_groups(groups)
        return table.slice(where.start - (first_row or 0), where.num_rows)
