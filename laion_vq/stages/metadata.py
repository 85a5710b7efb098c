"""Stage 1: slice shard N out of the LAION metadata parts and store it as `metadata/NNNNN.parquet`."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import pyarrow.parquet as pq

from laion_vq.shards.metadata import LaionMetadata
from laion_vq.shards.storage import StorageLayout, publish_bytes


@dataclass
class MetadataShardResult:
    shard_id: int
    path: str
    rows: int
    source_file: str
    source_rows: tuple[int, int]
    bytes: int
    seconds: float


def write_metadata_shard(meta: LaionMetadata, layout: StorageLayout, shard_id: int) -> MetadataShardResult:
    """Slice shard `shard_id` out of the LAION parts and store it as `metadata/NNNNN.parquet`."""
    start = time.perf_counter()
    where = meta.locate(shard_id)
    table = meta.read_shard(shard_id)
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
    )
