"""Cut LAION metadata into shards the way img2dataset numbers them, reading only what a shard needs.

img2dataset sorts the part files, cuts each part on its own into `ceil(rows / S)` shards (the last one
partial) and keeps counting into the next part. We reproduce that numbering from the parquet footers
alone (row counts and row-group sizes), then read just the row groups that overlap one shard: a shard
of a 1 GB part costs one or two row groups, not the part.
"""

from __future__ import annotations

import bisect
import glob as globlib
import math
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.schema import LAION_SCHEMA, SchemaError, conform_laion_table
from laion_vq.shards.storage import filesystem


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


def resolve_parts(source: str) -> list[str]:
    """Part files for a parquet file, a folder of parts or a glob, sorted as img2dataset sorts them."""
    fs, path = filesystem(source)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if globlib.has_magic(path):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(fs.glob(path.rstrip("/") + "/*.parquet"))
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"LAION metadata source {source!r} does not exist")
    if not paths:
        raise FileNotFoundError(f"LAION metadata source {source!r} matches no parquet files")
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


class LaionMetadata:
    """The metadata parts behind one source, indexed into shards of `samples_per_shard` rows."""

    def __init__(self, source: str, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be ≥ 1, got {samples_per_shard}")
        self.source = source
        self.samples_per_shard = samples_per_shard

    @cached_property
    def parts(self) -> list[PartFile]:
        return [read_footer(url) for url in resolve_parts(self.source)]

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
        """The shard's rows in LAION_SCHEMA, reading only the overlapping row groups."""
        where = self.locate(shard_id)
        part = where.part
        missing = [c for c in ("URL", "TEXT") if c not in part.columns]
        if missing:
            raise SchemaError(
                f"{part.url}: missing required LAION column(s) {missing}; columns present: {list(part.columns)}"
            )
        wanted = [name for name in LAION_SCHEMA.names if name in part.columns]
        groups, offset, first_row = [], 0, None
        for index, rows in enumerate(part.row_group_rows):
            if offset < where.stop and offset + rows > where.start:
                groups.append(index)
                if first_row is None:
                    first_row = offset
            offset += rows
        fs, path = filesystem(part.url)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_groups(groups, columns=wanted)
        table = table.slice(where.start - (first_row or 0), where.num_rows)
        return conform_laion_table(table, f"{part.url} (shard {shard_id:05d})")
