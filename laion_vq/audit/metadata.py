"""raw_metadata_shards: the shard has the rows it should (samples per shard, or the partial last shard),
the URL and caption columns its source format names (recorded in the shard), and a URL on every row."""

from __future__ import annotations

import io

import pyarrow.compute as pc
import pyarrow.parquet as pq

from laion_vq.audit.verdict import ShardVerdict
from laion_vq.download.img2dataset_shard import expected_key
from laion_vq.shards.metadata import ShardSource
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, exists, read_bytes


def audit_metadata_shard(
    layout: StorageLayout, key: str, expected_rows: int | None, samples_per_shard: int
) -> ShardVerdict:
    """`expected_rows` comes from the LAION parts (`LaionMetadata.locate(shard).num_rows`); None when the
    shard is no longer in the source (then only the file's own consistency is checked)."""
    verdict = ShardVerdict(key)
    shard = parse_shard_key(key)
    url = layout.metadata_shard(shard)
    if not exists(url):
        verdict.error("metadata shard missing", f"{url} does not exist")
        return verdict
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url)))
    except Exception as err:  # unreadable is corruption
        verdict.error("unreadable parquet", f"{url}: {type(err).__name__}: {err}")
        return verdict
    verdict.counts["rows"] = table.num_rows
    if expected_rows is not None and table.num_rows != expected_rows:
        verdict.error("row count mismatch", f"{table.num_rows} rows, the LAION parts give this shard {expected_rows}")
    source = ShardSource.from_schema(table.schema)
    if source.filtered_rows:
        verdict.counts["filtered"] = len(source.filtered_rows)
    missing = [c for c in (source.url_column, source.caption_column) if c not in table.column_names]
    if missing:
        verdict.error("missing columns", f"required column(s) {missing} missing; has {table.column_names}")
        return verdict
    urls = table.column(source.url_column)
    nulls = pc.is_null(urls)
    empty = pc.equal(pc.utf8_length(pc.fill_null(urls, "")), 0)
    bad = pc.or_(nulls, empty)
    bad_rows = (
        pc.indices_nonzero(bad).to_pylist()
        if hasattr(pc, "indices_nonzero")
        else [i for i, flag in enumerate(bad.to_pylist()) if flag]
    )
    verdict.counts["null_urls"] = len(bad_rows)
    if bad_rows:
        first = expected_key(shard, bad_rows[0], max(samples_per_shard, table.num_rows))
        verdict.error("null url", f"{len(bad_rows)} row(s) without a URL, first {first} (row {bad_rows[0]})")
    return verdict
