"""image_tars: the status parquet has one row per metadata row, img2dataset's stats agree with it, and the
tar reads to the end holding exactly the recorded images, each hashing to the sha256 recorded at
download. A success rate under the floor is a WARN: dead links are normal on LAION (LAION-400M tars
kept ~50–90 %), a shard at 5 % usually means a network problem worth a retry.

Rows with status `removed` (taken out by a removal list: never requested, or dropped by image hash) have
no tar sample; one found in the tar is an ERROR of its own. The reported `success_rate`, and the floor, are
over the rows still subject to download (`shards.schema.success_rate`): rows a removal list or the filter
took out were never requested, or are gone by choice, so they say nothing about the network."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.audit.verdict import Problem, ShardVerdict, first_keys
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.schema import FILTERED_STATUS as FILTERED
from laion_vq.shards.schema import REMOVED_STATUS as REMOVED
from laion_vq.shards.schema import success_rate
from laion_vq.shards.storage import StorageLayout, exists, read_bytes, size
from laion_vq.shards.tar_reader import CorruptShardError, iter_samples

#: Below this a shard's download is flagged (WARN) as worth a retry.
MIN_SUCCESS_RATE = 0.3


def tar_problems(tar_url: str, status: pa.Table) -> list[Problem]:
    """What is wrong with a shard's tar against its status parquet, each naming the first bad key: it
    must read to the end, hold one image + caption + json per success key and nothing else, and each
    image's bytes must hash to the `jpg_sha256` recorded at download (where the column exists)."""
    rows = status.select([c for c in ("key", "status", "jpg_sha256") if c in status.column_names]).to_pylist()
    expected = {row["key"]: row.get("jpg_sha256") for row in rows if row["status"] == "success"}
    removed = {row["key"] for row in rows if row["status"] == REMOVED}
    seen: set[str] = set()
    incomplete: list[str] = []
    mismatched: list[str] = []
    unexpected: list[str] = []
    still_there: list[str] = []
    try:
        for sample in iter_samples(tar_url):
            seen.add(sample.key)
            if sample.key in removed:
                still_there.append(sample.key)
                continue
            if sample.key not in expected:
                unexpected.append(sample.key)
                continue
            if sample.image is None or "txt" not in sample.files or "json" not in sample.files:
                incomplete.append(sample.key)
            elif expected[sample.key] and hashlib.sha256(sample.image).hexdigest() != expected[sample.key]:
                mismatched.append(sample.key)
    except CorruptShardError as err:
        return [Problem("tar unreadable", f"tar unreadable: {err}")]
    missing = sorted(set(expected) - seen)
    found = []
    for label, keys, reason in (
        ("removed item(s) still in the tar", still_there, "removed item in tar"),
        ("success key(s) missing from the tar", missing, "tar missing images"),
        ("tar sample(s) without a success row", unexpected, "status disagrees with tar"),
        ("sample(s) lacking image, caption or json", incomplete, "incomplete samples"),
        ("image(s) whose bytes differ from the sha256 recorded at download", mismatched, "image hash mismatch"),
    ):
        if keys:
            found.append(first_keys(label, keys, reason))
    return found


def audit_image_shard(layout: StorageLayout, key: str, min_success_rate: float = MIN_SUCCESS_RATE) -> ShardVerdict:
    verdict = ShardVerdict(key)
    shard = parse_shard_key(key)
    if not exists(layout.image_status(shard)):
        verdict.error("status parquet missing", f"{layout.image_status(shard)} does not exist")
        return verdict
    try:
        status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(shard))))
    except Exception as err:  # unreadable means corrupted
        verdict.error("unreadable status parquet", f"unreadable status parquet: {type(err).__name__}: {err}")
        return verdict
    rows = status.num_rows
    statuses = status.column("status").to_pylist()
    successes = statuses.count("success")
    removed = statuses.count(REMOVED)
    filtered = statuses.count(FILTERED)
    rate = success_rate(successes, rows, removed, filtered)
    verdict.counts.update(rows=rows, successes=successes)
    if rate is not None:  # none when no row was left to download
        verdict.counts.update(success_rate=round(rate, 4))
    if removed:
        verdict.counts.update(removed=removed)
    if filtered:
        verdict.counts.update(filtered=filtered)
    if exists(layout.metadata_shard(shard)):
        expected = pq.ParquetFile(io.BytesIO(read_bytes(layout.metadata_shard(shard)))).metadata.num_rows
        if rows != expected:
            verdict.error("status rows mismatch", f"status parquet has {rows} rows, metadata shard has {expected}")
    tar = layout.image_tar(shard)
    if not exists(tar):
        verdict.error("tar missing", f"{tar} does not exist")
    elif successes and size(tar) == 0:
        verdict.error("tar empty", f"tar is empty but {successes} successes are recorded")
    else:
        verdict.errors.extend(tar_problems(tar, status))
    if exists(layout.image_stats(shard)):
        stats = json.loads(read_bytes(layout.image_stats(shard)))
        # a stats json written before removal lists has no `removed` count: it had none
        said = (stats.get("count"), stats.get("successes"), stats.get(REMOVED, 0), stats.get(FILTERED, 0))
        if said != (rows, successes, removed, filtered):
            verdict.error(
                "stats disagree",
                f"stats json says {said[0]} rows / {said[1]} successes / {said[2]} removed / {said[3]} filtered, "
                f"status parquet {rows} / {successes} / {removed} / {filtered}",
            )
    else:
        verdict.error("stats json missing", f"{layout.image_stats(shard)} does not exist")
    requested = rows - removed - filtered
    if rate is not None and rate < min_success_rate:
        verdict.warn(
            "low success rate",
            f"success rate {rate:.1%} below {min_success_rate:.0%} ({successes}/{requested}"
            + (f" requested, {removed + filtered} removed or filtered)" if removed + filtered else ")"),
        )
    return verdict
