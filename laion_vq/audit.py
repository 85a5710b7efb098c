"""Audits of what is on storage, shard by shard: which shards are corrupted, and why.

No Dagster here; `laion_vq.defs.checks` turns these reports into asset-check results.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.shards.codes import check_codes_table, read_codes_provenance
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, exists, filesystem, read_bytes, size
from laion_vq.shards.tar_reader import CorruptShardError, iter_samples


@dataclass
class AuditReport:
    shards_checked: int = 0
    rows_checked: int = 0
    corrupted: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.shards_checked > 0 and not self.corrupted


def _shard_files(directory: str, suffix: str, only: Sequence[str] | None) -> list[str]:
    """Shard keys of every `NNNNN<suffix>` in `directory` (other names are reported by the caller), or
    just `only` when given: those shards are audited whether or not their file exists."""
    if only is not None:
        return sorted(only)
    fs, path = filesystem(directory)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.glob(path.rstrip("/") + f"/*{suffix}"))
    return [p.rsplit("/", 1)[-1].removesuffix(suffix) for p in found]


def audit_code_shards(
    layout: StorageLayout, model: str, grid: int, n_embed: int, only: Sequence[str] | None = None
) -> AuditReport:
    """Every code parquet (or the shards in `only`): shape (grid×grid int16), range [0, n_embed), keys
    unique/sorted/of the shard, and code rows = downloaded successes − undecodable images."""
    report = AuditReport()
    for key in _shard_files(layout.codes_dir(model), ".parquet", only):
        report.shards_checked += 1
        try:
            shard = parse_shard_key(key)
        except ValueError:
            report.corrupted[key] = ["file name is not a shard key"]
            continue
        url = layout.code_shard(model, shard)
        if not exists(url):
            report.corrupted[key] = ["code parquet missing"]
            continue
        try:
            table = pq.read_table(io.BytesIO(read_bytes(url)))
        except Exception as err:  # noqa: BLE001 - an unreadable file is a corrupted shard
            report.corrupted[key] = [f"unreadable parquet: {err}"]
            continue
        contract = check_codes_table(table, shard, grid, n_embed)
        problems = list(contract.problems)
        report.rows_checked += contract.rows
        status_url = layout.image_status(shard)
        if exists(status_url):
            status = pq.read_table(io.BytesIO(read_bytes(status_url)), columns=["status"])
            successes = status.column("status").to_pylist().count("success")
            undecodable = sum(read_codes_provenance(url).get("undecodable", {}).values())
            if contract.rows != successes - undecodable:
                problems.append(
                    f"counts do not reconcile: {contract.rows} code rows but {successes} downloaded − "
                    f"{undecodable} undecodable = {successes - undecodable}"
                )
        else:
            problems.append("no img2dataset status parquet to reconcile counts against")
        if problems:
            report.corrupted[key] = problems
    return report


def tar_problems(tar_url: str, status: pa.Table) -> list[str]:
    """What is wrong with a shard's tar against its status parquet, each naming the first bad key: it
    must read to the end, hold one image + caption + json per success key and nothing else, and each
    image's bytes must hash to the `jpg_sha256` recorded at download (where the column exists)."""
    rows = status.select([c for c in ("key", "status", "jpg_sha256") if c in status.column_names]).to_pylist()
    expected = {row["key"]: row.get("jpg_sha256") for row in rows if row["status"] == "success"}
    seen: set[str] = set()
    incomplete: list[str] = []
    mismatched: list[str] = []
    unexpected: list[str] = []
    try:
        for sample in iter_samples(tar_url):
            seen.add(sample.key)
            if sample.key not in expected:
                unexpected.append(sample.key)
                continue
            if sample.image is None or "txt" not in sample.files or "json" not in sample.files:
                incomplete.append(sample.key)
            elif expected[sample.key] and hashlib.sha256(sample.image).hexdigest() != expected[sample.key]:
                mismatched.append(sample.key)
    except CorruptShardError as err:
        return [f"tar unreadable: {err}"]
    problems = []
    missing = sorted(set(expected) - seen)
    for label, keys in (
        ("success key(s) missing from the tar", missing),
        ("tar sample(s) without a success row", unexpected),
        ("sample(s) lacking image, caption or json", incomplete),
        ("image(s) whose bytes differ from the sha256 recorded at download", mismatched),
    ):
        if keys:
            problems.append(f"{len(keys)} {label}, first {keys[0]}")
    return problems


def audit_image_shards(
    layout: StorageLayout, min_success_rate: float, only: Sequence[str] | None = None
) -> AuditReport:
    """Every downloaded shard: status parquet readable with one row per metadata row, img2dataset's stats
    agreeing with it, a tar that reads to the end and holds exactly the recorded images (`tar_problems`);
    success rates below `min_success_rate` are warnings (dead links are normal on LAION, a shard at 5%
    usually means a network problem worth a retry)."""
    report = AuditReport()
    for key in _shard_files(layout.images_dir(), ".parquet", only):
        report.shards_checked += 1
        problems: list[str] = []
        if only is not None and not exists(layout.image_status(parse_shard_key(key))):
            report.corrupted[key] = ["status parquet missing"]
            continue
        try:
            shard = parse_shard_key(key)
            status = pq.read_table(io.BytesIO(read_bytes(layout.image_status(shard))))
        except Exception as err:  # noqa: BLE001 - unreadable means corrupted
            report.corrupted[key] = [f"unreadable status parquet: {err}"]
            continue
        rows = status.num_rows
        report.rows_checked += rows
        successes = status.column("status").to_pylist().count("success")
        if exists(layout.metadata_shard(shard)):
            expected = pq.ParquetFile(io.BytesIO(read_bytes(layout.metadata_shard(shard)))).metadata.num_rows
            if rows != expected:
                problems.append(f"status parquet has {rows} rows, metadata shard has {expected}")
        if not exists(layout.image_tar(shard)):
            problems.append("tar missing")
        elif successes and size(layout.image_tar(shard)) == 0:
            problems.append(f"tar is empty but {successes} successes are recorded")
        else:
            problems.extend(tar_problems(layout.image_tar(shard), status))
        if exists(layout.image_stats(shard)):
            stats = json.loads(read_bytes(layout.image_stats(shard)))
            if (stats.get("count"), stats.get("successes")) != (rows, successes):
                problems.append(
                    f"stats json says {stats.get('count')} rows / {stats.get('successes')} successes, "
                    f"status parquet {rows} / {successes}"
                )
        else:
            problems.append("stats json missing")
        if problems:
            report.corrupted[key] = problems
        elif rows and successes / rows < min_success_rate:
            report.warnings[key] = [f"success rate {successes / rows:.1%} below {min_success_rate:.0%}"]
    return report
