"""Stage 1: slice shard N out of the metadata parts and store it as `metadata/NNNNN.parquet`.

The shard keeps every row and every column of the source: keys are row positions (img2dataset's
numbering), so a filter never renumbers anything. What the later stages need to read the shard travels with
it, in the parquet's key-value metadata (`laion_vq`, `ShardSource`): which columns hold URL and caption, the
image hash to verify, and the filter with the rows it rejected. Those rows are never requested by the
download stage; they end in the status parquet as `filtered`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.metadata import SHARD_SOURCE_KEY, LaionMetadata, ShardSource
from laion_vq.shards.schema import SchemaError
from laion_vq.shards.storage import StorageLayout, publish_bytes


class FilterError(ValueError):
    """A filter predicate that does not parse, or names columns the source lacks."""


def filter_mask(table: pa.Table, predicate: str) -> list[bool]:
    """Which rows pass `predicate`, a SQL expression over the table's columns evaluated by polars' SQL engine.
    A row where it is null (a missing score) does not pass: a filter keeps only what it can vouch for."""
    import polars as pl

    try:
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        mask = frame.select(pl.sql_expr(predicate).fill_null(False).alias("keep")).get_column("keep")
    except Exception as err:  # polars raises many types for a bad expression; one clear error
        raise FilterError(
            f"LAION_VQ_FILTER {predicate!r} cannot be evaluated on columns {table.column_names}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if mask.dtype != pl.Boolean:
        raise FilterError(f"LAION_VQ_FILTER {predicate!r} gives {mask.dtype} values, not true/false")
    return mask.to_list()


def check_filter(predicate: str, schema: pa.Schema) -> None:
    """Evaluate `predicate` on an empty table of `schema`: a typo fails once, before any shard is cut."""
    filter_mask(schema.empty_table(), predicate)


@dataclass
class MetadataShardResult:
    shard_id: int
    path: str
    rows: int
    source_file: str
    source_rows: tuple[int, int]
    bytes: int
    seconds: float
    #: rows the filter rejected (never downloaded)
    filtered: int = 0


def write_metadata_shard(
    meta: LaionMetadata, layout: StorageLayout, shard_id: int, row_filter: str | None = None
) -> MetadataShardResult:
    """Slice shard `shard_id` out of the parts, apply the filter, store it as `metadata/NNNNN.parquet`."""
    start = time.perf_counter()
    where = meta.locate(shard_id)
    table = meta.read_shard(shard_id)
    filtered: tuple[int, ...] = ()
    if row_filter:
        keep = filter_mask(table, row_filter)
        filtered = tuple(i for i, ok in enumerate(keep) if not ok)
    record = ShardSource.of(meta.format, row_filter, filtered)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_SOURCE_KEY: record.to_json()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    dest = layout.metadata_shard(shard_id)
    nbytes = publish_bytes(buffer.getvalue(), dest)
    return MetadataShardResult(
        shard_id=shard_id,
        path=dest,
        rows=table.num_rows,
        source_file=where.part.url,
        source_rows=(where.start, where.stop),
        bytes=nbytes,
        seconds=time.perf_counter() - start,
        filtered=len(filtered),
    )


def read_metadata_shard(data: bytes) -> tuple[pa.Table, ShardSource]:
    """A stored metadata shard and its record (`ShardSource`)."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaError(f"unreadable metadata shard: {err}") from err
    return table, ShardSource.from_schema(table.schema)
