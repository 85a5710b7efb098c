"""Schedules: keep downloading the next missing shards, and audit every shard nightly (both off until an
operator turns them on in the UI)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import dagster as dg

from laion_vq import settings
from laion_vq.dagster_internals import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    UnresolvedAssetJobDefinition,
)
from laion_vq.defs.partitions import shard_partitions
from laion_vq.shards.exclusions import read_exclusions

#: Runs that still hold their shards: queued, starting, running (a second run for them would race).
_UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def nightly_audit(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    """Re-prove every image tar and code parquet at 04:00, so corruption on storage is found, not met."""
    return dg.ScheduleDefinition(
        name="nightly_shard_audit",
        job=job,
        cron_schedule="0 4 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Audit every image tar and code parquet on storage; the checks list corrupted shards.",
    )


def daily_report(job: UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Refresh the corrupted-shards report and the dataset card at 06:00, after the nightly audit."""
    return dg.ScheduleDefinition(
        name="daily_corrupted_shards_report",
        job=job,
        cron_schedule="0 6 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Summarise every shard's check results and counts; regenerate codes/<model>/README.md.",
    )


@dataclass(frozen=True)
class ShardBatch:
    """Consecutive shards one run downloads, and how often its first shard has failed before."""

    keys: tuple[str, ...]
    attempt: int

    @property
    def run_key(self) -> str:
        """The same batch on the same attempt gets the same key: a tick never doubles a run, and a
        failed batch is asked for again (as a new attempt) until it fails too often."""
        return f"{self.keys[0]}-{self.keys[-1]}-attempt{self.attempt}"


def next_missing_batches(
    all_keys: Sequence[str],
    done: set[str],
    in_flight: set[str],
    failures: Counter[str],
    *,
    count: int,
    max_failures: int,
    shards_per_run: int,
) -> list[ShardBatch]:
    """The first `count` shards that are neither done, in flight nor failed `max_failures` times, in
    shard order, cut into runs of at most `shards_per_run` consecutive shards."""
    batches: list[list[str]] = []
    previous = -2
    picked = 0
    for index, key in enumerate(all_keys):
        if picked == count:
            break
        if key in done or key in in_flight or failures[key] >= max_failures:
            continue
        if index != previous + 1 or len(batches[-1]) == shards_per_run:
            batches.append([])
        batches[-1].append(key)
        previous, picked = index, picked + 1
    return [ShardBatch(tuple(keys), failures[keys[0]]) for keys in batches]


def _run_shards(run: dg.DagsterRun) -> Iterator[str]:
    """The shards a run covers, from its partition or partition-range tags."""
    tags = run.tags
    if PARTITION_NAME_TAG in tags:
        yield tags[PARTITION_NAME_TAG]
    elif ASSET_PARTITION_RANGE_START_TAG in tags:
        yield from shard_partitions.get_partition_keys_in_range(
            dg.PartitionKeyRange(tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG])
        )


def _shards_of(records: Iterable[dg.RunRecord]) -> Iterator[str]:
    for record in records:
        yield from _run_shards(record.dagster_run)


def download_missing_shards(job: UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Every 15 minutes, ask for the next `LAION_VQ_SCHEDULE_SHARDS_PER_TICK` shards without images.

    Reads three things from the instance, all bounded whatever the partition count: the materialized
    partitions of `image_tars` (Dagster's cached asset status), unfinished runs of the job, and its last
    failed runs. Set K to what the download machines finish in a tick (README: Sizing).
    """

    @dg.schedule(
        name="download_missing_shards",
        job=job,
        cron_schedule="*/15 * * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Download the next missing shards each tick (skips in-flight, failed-too-often and excluded ones).",
        required_resource_keys={"storage"},
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest] | dg.SkipReason:
        instance = context.instance
        excluded = read_exclusions(context.resources.storage.layout)
        if excluded:
            context.log.info(f"skipping {len(excluded)} excluded shard(s) (excluded_shards.csv)")
        done = instance.get_materialized_partitions(dg.AssetKey("image_tars")) | set(excluded)
        unfinished = instance.get_run_records(dg.RunsFilter(job_name=job.name, statuses=_UNFINISHED))
        failed = instance.get_run_records(
            dg.RunsFilter(job_name=job.name, statuses=[dg.DagsterRunStatus.FAILURE]), limit=5000
        )
        batches = next_missing_batches(
            shard_partitions.get_partition_keys(),
            done,
            set(_shards_of(unfinished)),
            Counter(_shards_of(failed)),
            count=settings.SCHEDULE_SHARDS_PER_TICK.get_int(),
            max_failures=settings.SCHEDULE_MAX_FAILURES.get_int(),
            shards_per_run=settings.DOWNLOAD_SHARDS_PER_RUN.get_int(),
        )
        if not batches:
            return dg.SkipReason(
                f"nothing to download: {len(done - set(excluded))} shards done, {len(excluded)} excluded, "
                "the rest in flight or failing"
            )
        return (
            dg.RunRequest(
                run_key=batch.run_key,
                tags={ASSET_PARTITION_RANGE_START_TAG: batch.keys[0], ASSET_PARTITION_RANGE_END_TAG: batch.keys[-1]},
            )
            for batch in batches
        )

    return _schedule
