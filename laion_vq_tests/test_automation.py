"""Declarative automation over the real 10,000-partition definitions: a few hundred shards' metadata lands,
their downloads and encodings (and only theirs) are requested once; re-downloaded shards are re-encoded.
Evaluated on a real instance with Dagster's own evaluator; the sensor that acts on it is off by default
and emits backfills, so requests run in the assets' backfill batches."""

from __future__ import annotations

import time

import dagster as dg

from laion_vq.definitions import defs

SHARDS = [f"{i:05d}" for i in range(100, 400)]  # 300 shards in the middle of 10,000


def _land(instance: dg.DagsterInstance, asset: str, shards: list[str]) -> None:
    for shard in shards:
        instance.report_runless_asset_event(dg.AssetMaterialization(dg.AssetKey(asset), partition=shard))


def _evaluate(instance: dg.DagsterInstance, cursor=None):
    started = time.perf_counter()
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    return result, time.perf_counter() - started


def test_downloads_then_encodings_follow_their_upstream_once() -> None:
    images, codes = dg.AssetKey("image_tars"), dg.AssetKey("code_parquets")
    with dg.instance_for_test() as instance:
        first, _ = _evaluate(instance)
        assert first.total_requested == 0  # nothing upstream has landed: nothing to do

        _land(instance, "raw_metadata_shards", SHARDS)
        landed, seconds = _evaluate(instance, first.cursor)
        # downloads and, behind them in the same backfill, encodings of exactly these shards
        assert landed.get_requested_partitions(images) == set(SHARDS)
        assert landed.get_requested_partitions(codes) == set(SHARDS)
        again, _ = _evaluate(instance, landed.cursor)
        assert again.total_requested == 0  # one request per update, not one per tick

        _land(instance, "image_tars", SHARDS[:64])  # e.g. 64 shards re-downloaded
        encoded, _ = _evaluate(instance, again.cursor)
        assert encoded.get_requested_partitions(codes) == set(SHARDS[:64])
        assert encoded.get_num_requested(images) == 0
        print(f"evaluating 10,000 partitions × 3 assets after 300 updates: {seconds:.2f} s")


def test_the_sensor_is_off_by_default_and_emits_backfills() -> None:
    sensor = defs.get_sensor_def("shard_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.emit_backfills


def test_the_encoder_waits_for_a_passing_tar_check() -> None:
    """Across runs: a shard whose tar check failed (ERROR, on its latest tar) is not encoded; its neighbour
    whose check passed is. Nothing else is re-requested (the checks already ran on these tars)."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    images, codes = dg.AssetKey("image_tars"), dg.AssetKey("code_parquets")
    good, bad = "00007", "00008"
    with dg.instance_for_test() as instance:
        first, _ = _evaluate(instance)
        _land(instance, "image_tars", [good, bad])
        for shard in (good, bad):
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=images, asset_partitions=[shard]), limit=1
            ).records[0]
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(
                    asset_key=images,
                    check_name="image_tars_complete",
                    passed=shard == good,
                    severity=dg.AssetCheckSeverity.ERROR,
                    partition=shard,
                    blocking=True,
                    target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
                    ),
                )
            )
        result, _ = _evaluate(instance, first.cursor)
        assert result.get_requested_partitions(codes) == {good}
        assert result.get_num_requested(images) == 0
