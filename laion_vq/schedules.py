"""Schedules: a nightly audit of every shard on storage (off until an operator turns it on in the UI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def nightly_audit(job: UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Re-prove every image tar and code parquet at 04:00, so corruption on storage is found, not met."""
    return dg.ScheduleDefinition(
        name="nightly_shard_audit",
        job=job,
        cron_schedule="0 4 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Audit every image tar and code parquet on storage; the checks list corrupted shards.",
    )
