"""The `download_missing_shards` schedule: the next K shards without images, never the done, in-flight or
failed-too-often ones, in runs of consecutive shards with run keys that never double a run — evaluated
against real instances (ephemeral SQLite and PostgreSQL) holding 10,000 partitions."""

from __future__ import annotations

import time
from collections import Counter

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.test_utils import create_run_for_test

from laion_vq.definitions import defs
from laion_vq.defs.resources import StorageResource
from laion_vq.defs.schedules import ShardBatch, next_missing_batches
from laion_vq.shards.exclusions import write_exclusions
from laion_vq.shards.storage import StorageLayout

KEYS = [f"{i:05d}" for i in range(20)]


def test_batches_skip_done_in_flight_and_failing_shards() -> None:
    batches = next_missing_batches(
        KEYS,
        done={"00000", "00001", "00005"},
        in_flight={"00006", "00007"},
        failures=Counter({"00008": 3, "00009": 1}),
        count=7,
        max_failures=3,
        shards_per_run=4,
    )
    assert [b.keys for b in batches] == [("00002", "00003", "00004"), ("00009", "00010", "00011", "00012")]
    assert [b.run_key for b in batches] == ["00002-00004-attempt0", "00009-00012-attempt1"]


def test_batches_when_nothing_or_everything_is_missing() -> None:
    assert next_missing_batches(KEYS, set(KEYS), set(), Counter(), count=5, max_failures=3, shards_per_run=4) == []
    every = next_missing_batches(KEYS, set(), set(), Counter(), count=100, max_failures=3, shards_per_run=4)
    assert [len(b.keys) for b in every] == [4] * 5 and every[-1] == ShardBatch(("00016", "00017", "00018", "00019"), 0)


def _fabricate(instance: dg.DagsterInstance) -> None:
    """Shards 0–5 and 20–299 downloaded, 6–7 in a running download run, 8 failed three times, 9 once."""
    for i in [*range(6), *range(20, 300)]:
        instance.report_runless_asset_event(dg.AssetMaterialization(dg.AssetKey("image_tars"), partition=f"{i:05d}"))
    create_run_for_test(
        instance, job_name="download_shards", status=dg.DagsterRunStatus.STARTED,
        tags={ASSET_PARTITION_RANGE_START_TAG: "00006", ASSET_PARTITION_RANGE_END_TAG: "00007"},
    )  # fmt: skip
    for shard, times in (("00008", 3), ("00009", 1)):
        for _ in range(times):
            create_run_for_test(
                instance, job_name="download_shards", status=dg.DagsterRunStatus.FAILURE,
                tags={"dagster/partition": shard},
            )  # fmt: skip


def _tick(instance: dg.DagsterInstance, root: str) -> tuple[list[dg.RunRequest], float]:
    schedule = defs.get_schedule_def("download_missing_shards")
    started = time.perf_counter()
    context = dg.build_schedule_context(instance=instance, resources={"storage": StorageResource(root=root)})
    data = schedule.evaluate_tick(context)
    return list(data.run_requests or []), time.perf_counter() - started


def _assert_the_tick(instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    monkeypatch.setenv("LAION_VQ_SCHEDULE_SHARDS_PER_TICK", "10")
    _fabricate(instance)
    write_exclusions(StorageLayout(root), {"00012": "source part unreadable"})
    requests, seconds = _tick(instance, root)
    ranges = [(r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in requests]
    # 10 shards in runs of up to 8 consecutive ones; 00012 is on the exclusion list: never asked for
    assert ranges == [("00009", "00011"), ("00013", "00019")]
    assert [r.run_key for r in requests] == ["00009-00011-attempt1", "00013-00019-attempt0"]
    again, _ = _tick(instance, root)
    assert [r.run_key for r in again] == [r.run_key for r in requests]  # the daemon skips keys it has seen
    print(f"tick over 10,000 partitions with 286 done: {seconds:.2f} s")


def test_the_tick_on_an_ephemeral_instance(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with dg.instance_for_test() as instance:
        _assert_the_tick(instance, monkeypatch, str(tmp_path))


def test_the_tick_on_postgres(postgres_instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _assert_the_tick(postgres_instance, monkeypatch, str(tmp_path))


def test_a_tick_with_nothing_to_do_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LAION_VQ_SCHEDULE_SHARDS_PER_TICK", "0")
    with dg.instance_for_test() as instance:
        schedule = defs.get_schedule_def("download_missing_shards")
        storage = StorageResource(root=str(tmp_path))
        context = dg.build_schedule_context(instance=instance, resources={"storage": storage})
        data = schedule.evaluate_tick(context)
        assert not data.run_requests and "nothing to download" in (data.skip_message or "")
