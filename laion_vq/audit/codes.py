"""code_parquets: today's contract (grid×grid int16 codes in [0, n_embed), unique sorted keys of the shard,
the seed schema with every source column of the shard's status parquet) and the reconciliation with the
download: every success key has a code row unless the encoder recorded it as undecodable, and no other key
does."""

from __future__ import annotations

import io

import pyarrow.parquet as pq

from laion_vq.audit.verdict import ShardVerdict, first_keys
from laion_vq.shards.codes import check_codes_table, read_codes_provenance
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import codes_schema
from laion_vq.shards.storage import StorageLayout, exists, read_bytes


def audit_code_shard(layout: StorageLayout, model: str, key: str, grid: int, n_embed: int) -> ShardVerdict:
    verdict = ShardVerdict(key)
    shard = parse_shard_key(key)
    url = layout.code_shard(model, shard)
    if not exists(url):
        verdict.error("code parquet missing", f"{url} does not exist")
        return verdict
    try:
        table = pq.read_table(io.BytesIO(read_bytes(url)))
    except Exception as err:  # an unreadable file is a corrupted shard
        verdict.error("unreadable parquet", f"unreadable parquet: {type(err).__name__}: {err}")
        return verdict
    status_url = layout.image_status(shard)
    try:
        status_file = pq.ParquetFile(io.BytesIO(read_bytes(status_url))) if exists(status_url) else None
    except Exception as err:  # the tar check reports the status parquet itself
        verdict.error("unreadable status parquet", f"unreadable status parquet: {type(err).__name__}: {err}")
        return verdict
    required = None if status_file is None else codes_schema(status_file.schema_arrow).names
    contract = check_codes_table(table, shard, grid, n_embed, required=required)
    for reason, detail in contract.failures:
        verdict.error(reason, detail)
    verdict.counts.update(rows=contract.rows, distinct_codes=contract.distinct_codes)
    if status_file is None:
        verdict.error("no status parquet", "no img2dataset status parquet to reconcile the code rows against")
        return verdict
    status = status_file.read(columns=["key", "status"]).to_pylist()
    successes = {row["key"] for row in status if row["status"] == "success"}
    provenance = read_codes_provenance(url)
    undecodable = sum(provenance.get("undecodable", {}).values())
    if "undecodable_keys" in provenance and "key" in table.column_names:
        expected = successes - set(provenance["undecodable_keys"])
        present = {k for k in table.column("key").to_pylist() if k is not None}
        if expected - present:
            lost = list(expected - present)
            verdict.errors.append(first_keys("downloaded image(s) without a code row", lost, "missing keys"))
        if present - expected:
            extra = list(present - expected)
            verdict.errors.append(first_keys("code row(s) for no downloaded image", extra, "extra keys"))
    elif contract.rows != len(successes) - undecodable:  # files written before undecodable keys were recorded
        verdict.error(
            "counts do not reconcile",
            f"{contract.rows} code rows but {len(successes)} downloaded − {undecodable} undecodable "
            f"= {len(successes) - undecodable}",
        )
    return verdict
