"""The corrupted-shards report at 10,000 shards, end to end on the real instance (PostgreSQL).

Fabricates N shards' records the way the pipeline leaves them — a materialization per shard for each of
the three assets with the metadata the assets record, one evaluation per shard for each of the three
partitioned checks, 0.1 % failing, and a code parquet per shard whose footer holds its packed usage
histogram (~19 KB) — then times what the `corrupted_shards_report` asset does: read the per-partition
check state and the latest materializations plus the usage in the code parquets' footers
(`laion_vq.defs.assets.report._frames`; cold: every footer read; warm: the report's cache, none read),
build the polars report, write it. Reference, same instance, same run: the obvious per-partition reads
(one query per shard and asset, one history query per shard and check) on a sample of shards, scaled to N.

    .venv/bin/python benchmarks/bench_report_instance.py [--shards 10000] [--reference-sample 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

from laion_vq.defs.assets.report import _frames
from laion_vq.defs.check_state import SHARD_CHECK_KEYS, latest_materializations
from laion_vq.report.shards import build_report, write_report
from laion_vq.report.usage import pack_code_usage
from laion_vq.shards.codes import write_codes_parquet
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.dagster_services import postgres_database

ASSETS = ("raw_metadata_shards", "image_tars", "code_parquets")


def _metadata(asset: str, shard: int) -> dict:
    if asset == "raw_metadata_shards":
        return {"dagster/row_count": 10_000, "bytes": 1_200_000}
    if asset == "image_tars":
        return {"dagster/row_count": 10_000, "successes": 8_000 + shard % 900, "tar_bytes": 300_000_000}
    return {
        "encoded": 8_000 + shard % 900,
        "undecodable": 3,
        "distinct_codes": 8_100,
        "checkpoint_sha256": "ab" * 32,
    }


FOLDER = "vqgan_gumbel_f8"


def write_footers(layout: StorageLayout, shards: int) -> None:
    """A one-row code parquet per shard whose footer holds a packed usage histogram, as the encoder leaves it."""
    import pyarrow as pa

    rng = np.random.default_rng(1)
    usages = [pack_code_usage(np.bincount(rng.zipf(1.3, 8_000 * 1024) % 8192, minlength=8192)) for _ in range(4)]
    for shard in range(shards):
        table = pa.table({"key": [f"{shard:05d}0000"]})
        write_codes_parquet(table, layout.code_shard(FOLDER, shard), {"code_usage": usages[shard % 4]})


def _entry(event: dg.AssetMaterialization) -> EventLogEntry:
    """The runless event `report_runless_asset_event` would store, for a batch write."""
    return EventLogEntry(
        error_info=None,
        level="debug",
        user_message="",
        run_id=RUNLESS_RUN_ID,
        timestamp=time.time(),
        dagster_event=DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
            event_specific_data=StepMaterializationData(event),
            job_name=RUNLESS_JOB_NAME,
        ),
    )


def fabricate(instance: dg.DagsterInstance, shards: int) -> float:
    """Materializations in batch writes (as many runs' steps would leave them), then one check evaluation
    per shard and check targeting its materialization, through the public API from 8 threads."""
    started = time.perf_counter()
    keys = [f"{shard:05d}" for shard in range(shards)]
    for asset in ASSETS:
        for start in range(0, shards, 500):
            batch = [
                _entry(dg.AssetMaterialization(dg.AssetKey(asset), partition=k, metadata=meta))
                for k in keys[start : start + 500]
                for meta in [_metadata(asset, int(k))]
            ]
            instance.event_log_storage.store_event_batch(batch)
    print(f"  materializations stored ({time.perf_counter() - started:.0f} s)", flush=True)
    targets = {asset: latest_materializations(instance, dg.AssetKey(asset), keys) for asset in ASSETS}
    done = [0]

    def one(shard: int) -> None:
        key = f"{shard:05d}"
        for asset, check in zip(ASSETS, SHARD_CHECK_KEYS, strict=True):
            record = targets[asset][key]
            failed = shard % 1000 == 7 and asset == "image_tars"
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=check.asset_key,
                    check_name=check.name,
                    passed=not failed,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description="1 image(s) whose bytes differ from the sha256 recorded, first x" if failed else None,
                    metadata={"reason": "image hash mismatch" if failed else ""},
                    partition=key,
                    target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
                    ),
                )
            )
        done[0] += 1
        if done[0] % 1000 == 0:
            print(f"  checks of {done[0]} shards ({time.perf_counter() - started:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=8) as pool:  # PostgreSQL takes concurrent writers; the GIL waits on I/O
        list(pool.map(one, range(shards)))
    return time.perf_counter() - started


def reference_seconds(instance: dg.DagsterInstance, shards: int, sample: int) -> float:
    """One query per shard and asset, one history query per shard and check, over `sample` shards, × N/sample."""
    keys = [f"{i:05d}" for i in np.linspace(0, shards - 1, sample).astype(int)]
    started = time.perf_counter()
    for key in keys:
        for asset in ASSETS:
            instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
            )
        for check in SHARD_CHECK_KEYS:
            instance.event_log_storage.get_asset_check_execution_history(
                check, limit=1, partition_filter=PartitionKeyFilter(key=key)
            )
    return (time.perf_counter() - started) * shards / sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--reference-sample", type=int, default=300)
    args = parser.parse_args()
    with postgres_database("laion_vq_bench_report") as url, tempfile.TemporaryDirectory() as home:
        config = f"storage:\n  postgres:\n    postgres_url: {url}\ntelemetry:\n  enabled: false\n"
        Path(home, "dagster.yaml").write_text(config)
        instance = dg.DagsterInstance.from_config(home)
        try:
            print(f"fabricating {args.shards} shards × 3 assets × (materialization + check evaluation) …")
            print(f"fabricated in {fabricate(instance, args.shards):.0f} s")
            layout = StorageLayout(str(Path(home, "data")))
            started = time.perf_counter()
            write_footers(layout, args.shards)
            print(f"wrote {args.shards} code parquets with usage footers in {time.perf_counter() - started:.0f} s")
            started = time.perf_counter()
            frames = _frames(instance, layout, FOLDER)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            frames = _frames(instance, layout, FOLDER)
            read = time.perf_counter() - started
            started = time.perf_counter()
            report = build_report(**frames, exclusions={}, previous=None, num_shards=10_000, n_embed=8192)
            write_report(report.table, str(Path(home, "report.parquet")))
            built = time.perf_counter() - started
            reference = reference_seconds(instance, args.shards, args.reference_sample)
        finally:
            instance.dispose()
    records = sum(f.height for f in frames.values())
    total = read + built
    print(f"instance reads + usage footers, cold cache (every footer read): {cold:.2f} s")
    print(
        f"instance reads: {records} records in {read:.2f} s (warm usage cache); polars report + write: {built:.2f} s; "
        f"total {total:.2f} s"
    )
    fabricated = len(range(7, args.shards, 1000))
    print(f"corrupted shards found: {report.summary['corrupted_shards']} (fabricated {fabricated})")
    print(f"reference (per-partition queries, scaled from {args.reference_sample} shards): {reference:.1f} s")
    print(f"ratio reference / ours: {reference / read:.1f}×")


if __name__ == "__main__":
    main()
