"""Reading per-shard state back from the instance: check results (for the encoder, which never encodes a
tar whose check failed, and for the corrupted-shards report) and each partition's latest materialization.
One query per check for all partitions, then one per failed shard (a handful among 10,000) for its
evaluation; materializations in pages of 500 partitions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from laion_vq.dagster_internals import AssetCheckExecutionRecordStatus, PartitionKeyFilter
from laion_vq.defs import metadata_keys as keys

METADATA_CHECK = dg.AssetCheckKey(dg.AssetKey("raw_metadata_shards"), "raw_metadata_shards_valid")
IMAGES_CHECK = dg.AssetCheckKey(dg.AssetKey("image_tars"), "image_tars_complete")
CODES_CHECK = dg.AssetCheckKey(dg.AssetKey("code_parquets"), "code_parquets_contract")
#: The same check on both assets that hold images or their codes: no item of a removal list is left.
REMOVED_IMAGES_CHECK = dg.AssetCheckKey(dg.AssetKey("image_tars"), "no_removed_items")
REMOVED_CODES_CHECK = dg.AssetCheckKey(dg.AssetKey("code_parquets"), "no_removed_items")
SHARD_CHECK_KEYS = (METADATA_CHECK, IMAGES_CHECK, CODES_CHECK, REMOVED_IMAGES_CHECK, REMOVED_CODES_CHECK)
#: Not a shard check: every list under `removals/` parses (a list that does not is applied nowhere).
LISTS_PARSE_CHECK = dg.AssetCheckKey(dg.AssetKey("removal_lists"), "removal_lists_parse")


def check_label(check: dg.AssetCheckKey) -> str:
    """How the report names a check: its name, or `asset.name` where two assets share the name."""
    shared = sum(1 for key in SHARD_CHECK_KEYS if key.name == check.name) > 1
    return f"{check.asset_key.to_user_string()}.{check.name}" if shared else check.name


@dataclass(frozen=True)
class ShardCheckResult:
    """The latest evaluation of one check on one shard."""

    shard: str
    check: str
    passed: bool
    severity: str
    reason: str | None
    detail: str | None
    checked_at: float
    current: bool  # targets the shard's latest materialization (a re-materialization makes it stale)


def latest_results(
    instance: dg.DagsterInstance, check: dg.AssetCheckKey, partition_keys: Sequence[str] | None = None
) -> list[ShardCheckResult]:
    """Every shard's latest result of `check` (or those in `partition_keys`); shards never evaluated are
    absent. For a run's shards Dagster's partition-status query answers (passed results carry no detail:
    they are the 99.9 %); for all shards (the report) the execution history is paged instead — Dagster's
    per-partition query grows faster than linearly (145 s at 10,000 shards × 3 checks on PostgreSQL)."""
    if partition_keys is None:
        return _latest_from_history(instance, check)
    infos = instance.event_log_storage.get_asset_check_partition_info([check], partition_keys=partition_keys)
    done = {
        AssetCheckExecutionRecordStatus.SUCCEEDED,
        AssetCheckExecutionRecordStatus.FAILED,
    }
    finished = [
        (i.partition_key, i) for i in infos if i.partition_key is not None and i.latest_execution_status in done
    ]
    failed = [key for key, i in finished if i.latest_execution_status == AssetCheckExecutionRecordStatus.FAILED]
    evaluations = {key: _latest_evaluation(instance, check, key) for key in failed}
    results = []
    for key, info in finished:
        entry = evaluations.get(key)
        results.append(
            _result(
                check,
                key,
                info.latest_execution_status == AssetCheckExecutionRecordStatus.SUCCEEDED,
                entry,
                info.is_current,
            )
        )
    return results


def _evaluation(entry: dg.EventLogEntry | None) -> dg.AssetCheckEvaluation | None:
    """The check evaluation an execution's event carries (None without an event)."""
    data = entry.dagster_event.event_specific_data if entry and entry.dagster_event else None
    return data if isinstance(data, dg.AssetCheckEvaluation) else None


def _result(
    check: dg.AssetCheckKey, shard: str, passed: bool, entry: dg.EventLogEntry | None, current: bool
) -> ShardCheckResult:
    evaluation = _evaluation(entry)
    reason = evaluation.metadata.get(keys.REASON) if evaluation else None
    return ShardCheckResult(
        shard=shard,
        check=check_label(check),
        passed=passed,
        severity=evaluation.severity.value if evaluation else "ERROR",
        reason=None if reason is None or passed else str(reason.value),
        detail=None if evaluation is None or passed else evaluation.description,
        checked_at=entry.timestamp if entry else 0.0,
        current=current,
    )


def _latest_from_history(instance: dg.DagsterInstance, check: dg.AssetCheckKey, page: int = 5000):
    """Newest finished execution per partition, paging the history newest first (one indexed query per
    page); current = it targets the partition's latest materialization (one query for all partitions)."""
    storage = instance.event_log_storage
    latest_mat = storage.get_latest_storage_id_by_partition(check.asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    finished = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    seen: dict[str, ShardCheckResult] = {}
    cursor = None
    while True:
        records = storage.get_asset_check_execution_history(check, limit=page, cursor=cursor, status=finished)
        for record in records:
            if record.partition is None or record.partition in seen:
                continue
            evaluation = _evaluation(record.event)
            target = evaluation.target_materialization_data if evaluation else None
            current = record.partition not in latest_mat or (
                target is not None and target.storage_id == latest_mat[record.partition]
            )
            passed = record.status == AssetCheckExecutionRecordStatus.SUCCEEDED
            seen[record.partition] = _result(check, record.partition, passed, record.event, current)
        if len(records) < page or (latest_mat and set(latest_mat) <= set(seen)):
            break
        cursor = records[-1].id
    return list(seen.values())


def latest_materializations(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, keys: Sequence[str], chunk: int = 500
) -> dict[str, dg.EventLogRecord]:
    """The newest materialization record of each partition in `keys` (paged queries, newest first)."""
    latest: dict[str, dg.EventLogRecord] = {}
    for start in range(0, len(keys), chunk):
        part = list(keys[start : start + chunk])
        cursor = None
        while True:
            page = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=part), limit=5000, cursor=cursor
            )
            for record in page.records:
                assert record.partition_key is not None  # the filter asks for partitions by key
                latest.setdefault(record.partition_key, record)
            if not page.has_more:
                break
            cursor = page.cursor
    return latest


def _latest_evaluation(
    instance: dg.DagsterInstance, check: dg.AssetCheckKey, partition: str
) -> dg.EventLogEntry | None:
    """The event of the shard's latest execution of `check` (its severity, description and metadata)."""
    history = instance.event_log_storage.get_asset_check_execution_history(
        check, limit=1, partition_filter=PartitionKeyFilter(key=partition)
    )
    return history[0].event if history else None


def failed_with_error(
    instance: dg.DagsterInstance, check: dg.AssetCheckKey, partition_keys: Sequence[str]
) -> dict[str, ShardCheckResult]:
    """Shards whose latest, still-current result of `check` is a failure with ERROR severity."""
    return {
        r.shard: r
        for r in latest_results(instance, check, partition_keys)
        if not r.passed and r.current and r.severity == "ERROR"
    }
