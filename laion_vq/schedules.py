"""Schedules: a nightly audit of every shard on storage (off until an operator turns it on in the UI)."""

from __future__ import annotations

import dagster as dg


def nightly_audit(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """Re-prove every image tar and code parquet at 04:00, so corruption on storage is found, not met."""
    return dg.ScheduleDefinition(
        name="nightly_shard_audit",
        job=job,
        cron_schedule="0 4 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Audit every image tar and code parquet on storage; the checks list corrupted shards.",
    )
