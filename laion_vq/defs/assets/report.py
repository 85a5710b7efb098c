"""corrupted_shards_report: every shard's check verdicts, counts and exclusion in one parquet, a summary in
the UI (corrupted shards by check and reason and since when, totals, codebook usage over all shards), and
the dataset card `codes/<model>/README.md` regenerated from what is on storage.

Reads the instance (each check's per-partition results, each shard's latest materialization metadata), and
of the shards' files only the code-usage histograms in the footers of code parquets new since the last report
(cached in `reports/code_usage_<name>.parquet`). Refreshed daily after the nightly
audit (`corrupted_shards_report` schedule) and on demand (Materialize in the UI).
"""

import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets.codes import code_parquets
from laion_vq.defs.check_state import SHARD_CHECK_KEYS, latest_materializations, latest_results
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import StorageResource, VQGANEncoderResource
from laion_vq.report.card import dataset_card, included_code_files
from laion_vq.report.previews import png_markdown
from laion_vq.report.shards import (
    CHECKS_SCHEMA,
    CODES_SCHEMA_REPORT,
    IMAGES_SCHEMA,
    METADATA_SCHEMA,
    build_report,
    code_usage_plot_png,
    read_report,
    summary_markdown,
    write_report,
)
from laion_vq.report.usage import cached_code_usage
from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, filesystem, publish_bytes


def _value(metadata: Mapping[str, Any], name: str, default=None):  # metadata values of any kind
    entry = metadata.get(name)
    return default if entry is None else entry.value


def _materialized(instance: dg.DagsterInstance, asset: str) -> list[tuple[str, float, Mapping[str, Any]]]:
    """(shard, timestamp, metadata) of each partition's latest materialization; excluded shards' records
    (skipped, `excluded` in their metadata) are left out: the exclusion list speaks for them."""
    key = dg.AssetKey(asset)
    partitions = sorted(instance.get_materialized_partitions(key))
    rows = []
    for shard, record in latest_materializations(instance, key, partitions).items():
        assert record.asset_materialization is not None  # a record fetched as a materialization
        metadata = record.asset_materialization.metadata
        if keys.EXCLUDED not in metadata:
            rows.append((shard, record.timestamp, metadata))
    return rows


def _frames(instance: dg.DagsterInstance, layout: StorageLayout, folder: str) -> dict[str, pl.DataFrame]:
    checks = [
        {
            "shard": r.shard,
            "check": r.check,
            "passed": r.passed,
            "severity": r.severity,
            "reason": r.reason,
            "detail": r.detail,
            "checked_at": r.checked_at,
        }
        for key in SHARD_CHECK_KEYS
        for r in latest_results(instance, key)
        if r.current  # a result on an older file says nothing about the one on storage now
    ]
    metadata = [
        {"shard": s, "rows": _value(m, keys.ROW_COUNT, 0), "materialized_at": t}
        for s, t, m in _materialized(instance, "raw_metadata_shards")
    ]
    images = [
        {
            "shard": s,
            "rows": _value(m, keys.ROW_COUNT, 0),
            "successes": _value(m, keys.SUCCESSES, 0),
            "tar_bytes": _value(m, keys.TAR_BYTES, 0),
            "removed": _value(m, keys.REMOVED, 0),
            "filtered": _value(m, keys.FILTERED, 0),
            "materialized_at": t,
        }
        for s, t, m in _materialized(instance, "image_tars")
    ]
    codes = [
        {
            "shard": s,
            "encoded": _value(m, keys.ENCODED, 0),
            "undecodable": _value(m, keys.UNDECODABLE, 0),
            "distinct_codes": _value(m, keys.DISTINCT_CODES, 0),
            "checkpoint_sha256": _value(m, keys.CHECKPOINT_SHA256),
            "materialized_at": t,
        }
        for s, t, m in _materialized(instance, "code_parquets")
    ]
    # the usage histograms live in the code parquets' footers (machine data, off the UI's metadata); a cache
    # beside the report means only new or re-encoded shards' footers are read
    files = {row["shard"]: (layout.code_shard(folder, int(row["shard"])), row["materialized_at"]) for row in codes}
    usage, _ = cached_code_usage(layout.code_usage_cache(folder), files)
    for row in codes:
        row["code_usage"] = usage[row["shard"]]
    return {
        "checks": pl.DataFrame(checks, schema=CHECKS_SCHEMA),
        "metadata": pl.DataFrame(metadata, schema=METADATA_SCHEMA),
        "images": pl.DataFrame(images, schema=IMAGES_SCHEMA),
        "codes": pl.DataFrame(codes, schema=CODES_SCHEMA_REPORT),
    }


def _removals_applied(layout: StorageLayout) -> list[dict]:
    """Each removal list on storage with the items the ledger says left the shards because of it (a list that
    does not parse was applied nowhere: the `removal_lists_parse` check names it, the card leaves it out)."""
    from laion_vq.removals import read_ledger, read_lists_skipping_broken

    lists, _ = read_lists_skipping_broken(layout)
    ledger = read_ledger(layout)
    removed: dict[str, int] = {}
    if ledger.height:
        for name, count in ledger.select("list_name", "shard", "key").unique().group_by("list_name").len().iter_rows():
            removed[name] = count
    names = {lst.name for lst in lists} | set(removed)
    by_name = {lst.name: lst for lst in lists}
    return [
        {
            "name": name,
            "sha256": by_name[name].sha256 if name in by_name else "(list no longer on storage)",
            "items": by_name[name].count if name in by_name else 0,
            "date": max((i.date for i in by_name[name].items), default="—") if name in by_name else "—",
            "removed": removed.get(name, 0),
        }
        for name in sorted(names)
    ]


def _columns_of(url: str) -> list[str]:
    """The columns of a code parquet (the source's columns ride along, so they differ by source)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def _write_card(layout, folder: str, report) -> tuple[str | None, int]:  # StorageLayout, ShardReport
    """The dataset card beside the code parquets, from the stored provenance of an included shard."""
    fs, path = filesystem(layout.codes_dir(folder))
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(path.rstrip("/") + "/*.parquet")] if fs.exists(path) else []
    included = included_code_files(report, names)
    if not included:
        return None, 0
    newest = parse_shard_key(included[-1].removesuffix(".parquet"))
    provenance = read_codes_provenance(layout.code_shard(folder, newest))
    card = dataset_card(
        model=folder,
        provenance=provenance,
        report=report,
        included_files=included,
        grid=int(provenance.get("grid", 32)),
        n_embed=int(provenance.get("n_embed", 8192)),
        code_columns=_columns_of(layout.code_shard(folder, newest)),
        removals=_removals_applied(layout),
    )
    publish_bytes(card.encode("utf-8"), layout.dataset_card(folder))
    return layout.dataset_card(folder), len(included)


@dg.asset(
    # after the shards' assets: in a run that also makes shards (`--select '*'`) it reports on them, and its
    # storage root exists by then
    deps=[code_parquets],
    group_name="reports",
    kinds={"polars", "parquet"},
    description=__doc__,
)
def corrupted_shards_report(
    context: dg.AssetExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> dg.MaterializeResult:
    layout = storage.existing_layout()
    started = time.perf_counter()
    frames = _frames(context.instance, layout, encoder.codes_folder)
    read_seconds = time.perf_counter() - started
    context.log.info(f"read {sum(f.height for f in frames.values())} records from the instance in {read_seconds:.1f}s")
    built = time.perf_counter()
    report = build_report(
        **frames,
        exclusions=read_exclusions(layout),
        previous=read_report(layout.corrupted_shards_report()),
        num_shards=len(shard_partitions.get_partition_keys()),
        n_embed=encoder.vqgan_config().n_embed,
    )
    nbytes = write_report(report.table, layout.corrupted_shards_report())
    card_path, included = _write_card(layout, encoder.codes_folder, report)
    build_seconds = time.perf_counter() - built
    summary = report.summary
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(layout.corrupted_shards_report()),
            "dataset_card": dg.MetadataValue.path(card_path or "(no code parquets yet)"),
            "corrupted_shards": summary["corrupted_shards"],
            "warned_shards": summary["warned_shards"],
            "excluded_shards": summary["excluded_shards"],
            "shards_downloaded": summary["shards_downloaded"],
            "shards_encoded": summary["shards_encoded"],
            "shards_in_card": included,
            "images_downloaded": summary["images_downloaded"],
            "overall_success_rate": round(summary["overall_success_rate"], 4),
            "codes": summary["codes"],
            "images_removed": summary["images_removed"],
            "codebook_used": f"{summary['codebook_used']} of {summary['n_embed']}",
            "corrupted_by_check": dg.MetadataValue.json(summary["corrupted_by_check"]),
            "corrupted_by_reason": dg.MetadataValue.json(summary["corrupted_by_reason"]),
            "summary": dg.MetadataValue.md(summary_markdown(report)),
            "codebook_usage": dg.MetadataValue.md(
                png_markdown(code_usage_plot_png(report.code_usage), "codebook usage, all shards")
            ),
            "read_seconds": round(read_seconds, 2),
            "build_seconds": round(build_seconds, 2),
            "report_bytes": nbytes,
        }
    )
