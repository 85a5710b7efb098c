"""Declarative automation: a shard's download follows its metadata, its encoding follows its download.

`image_tars` and `code_parquets` carry `AutomationCondition.eager()`: a partition is requested when its
upstream partition updates or is requested in the same evaluation (then both run in one backfill, the
encoder after the download), never while its upstream is missing or in progress, never twice for the
same update. Evaluating all 10,000 partitions takes ~0.1 s (`laion_vq_tests/test_automation.py`).
The `shard_automation` sensor evaluates them (off until an operator turns it on). It emits backfills,
so the requested partitions run in the assets' backfill batches (8 shards per download run, 256 per
encoder run), never one run per shard.
"""

from __future__ import annotations

import dagster as dg

from laion_vq.defs.assets import code_parquets, image_tars

shard_automation = dg.AutomationConditionSensorDefinition(
    "shard_automation",
    target=[image_tars, code_parquets],
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    emit_backfills=True,
    description="Download shards whose metadata updated and encode shards whose images updated.",
)
