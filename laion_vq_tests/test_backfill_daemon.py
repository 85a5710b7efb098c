"""A UI backfill of the whole graph, end to end: `launchPartitionBackfill` posted to a real `dagster-webserver`,
runs created by a real `dagster-daemon` and executed by its run launcher, on the production instance
(`deploy/dagster.yaml`: PostgreSQL, queued coordinator, pools) in a fresh database.

Three shards of a few samples from the loopback image server, the tiny f8 model: the backfill must cut them
into one metadata+download run (multi_run(8) batches the 3 shards) and an encoder run of its own, and every
partition of all three assets must end materialized with its per-shard numbers. The daemon's backfill
loop ticks every 30 s, so the daemon starts right after the launch (its first tick plans the backfill at
once) and the whole test takes about a minute; nothing here is timed.
"""

from __future__ import annotations

import time

import dagster as dg
import pyarrow.parquet as pq
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
)

from laion_vq.defs.check_state import SHARD_CHECK_KEYS, latest_results
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.dagster_services import BACKFILL_DONE
from laion_vq.testing.demo_inputs import shard_urls
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

NUM_SHARDS = 3
SAMPLES = 6
KEYS = [f"{i:05d}" for i in range(NUM_SHARDS)]
ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]

PARTITION_STATUS = """
query PartitionStatus($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
      }
    }
  }
}
"""


def _wait_for_backfill(services, daemon, backfill_id: str, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    backfill: dict = {}
    while time.monotonic() < deadline:
        backfill = services.backfill(backfill_id)
        if backfill.get("status") in BACKFILL_DONE:
            return backfill
        for name, process in {**services.processes, **daemon.processes}.items():
            assert process.poll() is None, f"{name} exited:\n{services.log(name)[-4000:]}"
        time.sleep(2)
    raise AssertionError(
        f"backfill {backfill_id} not finished after {timeout:.0f} s: {backfill}\n"
        f"daemon log:\n{services.log('daemon')[-4000:]}"
    )


def _run_failures(instance, records) -> str:
    out = []
    for record in records:
        if record.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
            logs = instance.all_logs(record.dagster_run.run_id)
            errors = [e.message for e in logs if e.is_dagster_event and e.dagster_event.is_failure]
            out.append(f"{record.dagster_run.run_id} {record.dagster_run.status}: {errors[-3:]}")
    return "\n".join(out)


def test_ui_backfill_of_three_shards_runs_on_daemon_and_postgres(tmp_path, image_server, tiny_checkpoint, pg_url):
    from laion_vq.testing.dagster_services import dagster_services

    urls = shard_urls(image_server, NUM_SHARDS, SAMPLES)
    write_parts(str(tmp_path / "meta"), urls, row_group_size=3)
    storage = tmp_path / "data"
    env = {
        "LAION_VQ_NUM_SHARDS": str(NUM_SHARDS),
        "LAION_VQ_SAMPLES_PER_SHARD": str(SAMPLES),
        "LAION_VQ_STORAGE": str(storage),
        "LAION_VQ_METADATA": str(tmp_path / "meta"),
        "LAION_VQ_MODEL": TINY_MODEL,
        "LAION_VQ_CHECKPOINT": tiny_checkpoint,
        "LAION_VQ_DEVICE": "cpu",
        "LAION_VQ_ENCODE_BATCH_SIZE": "4",
        "LAION_VQ_DOWNLOAD_THREADS": "8",
        "LAION_VQ_DOWNLOAD_TIMEOUT": "5",
        "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS": f"{image_server.host}/32",
    }
    home = tmp_path / "dagster_home"
    with dagster_services(home, pg_url, env=env, daemon=False) as services, services.instance() as instance:
        # what an operator does once per deployment (`dagster instance concurrency set download 2`, `gpu 1`)
        instance.event_log_storage.set_concurrency_slots("download", 2)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"

        # the UI's "Materialize all" → "Launch backfill" (launchPartitionBackfill with the assets and partitions)
        backfill_id = services.launch_backfill(ASSETS, KEYS)

        # the daemon starts now, so its first backfill iteration (every 30 s) comes at start-up
        with dagster_services(home, pg_url, env=env, webserver=False) as daemon:
            backfill = _wait_for_backfill(services, daemon, backfill_id)
        records = instance.get_run_records(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        assert backfill["status"] == "COMPLETED_SUCCESS", (
            f"{backfill}\n{_run_failures(instance, records)}\ndaemon log:\n{services.log('daemon')[-3000:]}"
        )
        assert backfill["isAssetBackfill"] and backfill["numPartitions"] == NUM_SHARDS
        statuses = backfill["assetBackfillData"]["assetBackfillStatuses"]
        assert {s["assetKey"]["path"][0]: s["numPartitionsMaterialized"] for s in statuses} == dict.fromkeys(
            ASSETS, NUM_SHARDS
        )
        assert all(s["numPartitionsFailed"] == 0 and s["numPartitionsInProgress"] == 0 for s in statuses)

        # runs: one per shard batch, never one per shard; the encoder never shares a run with downloads
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records), _run_failures(
            instance, records
        )
        download, encode = [], []
        for record in records:
            run = record.dagster_run
            selection = {k.to_user_string() for k in run.asset_selection or []}
            span = (run.tags[ASSET_PARTITION_RANGE_START_TAG], run.tags[ASSET_PARTITION_RANGE_END_TAG])
            if selection == {"raw_metadata_shards", "image_tars"}:
                download.append(span)
            else:
                assert selection == {"code_parquets"}, selection
                encode.append(span)
        assert download == [("00000", "00002")], download
        covered = sorted(k for start, end in encode for k in KEYS if start <= k <= end)
        assert covered == KEYS and len(encode) == 1, encode

        # every partition of every asset materialized, as the UI's partition bar shows it
        for asset in ASSETS:
            node = services.graphql(PARTITION_STATUS, {"assetKey": {"path": [asset]}})["assetNodeOrError"]
            parts = node["assetPartitionStatuses"]
            assert sorted(parts["materializedPartitions"]) == KEYS, (asset, parts)
            assert parts["failedPartitions"] == [] and parts["materializingPartitions"] == []

        # with each shard's own numbers on its own partition
        def materializations(asset: str) -> dict[str, dict]:
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
            return {
                r.asset_materialization.partition: {k: v.value for k, v in r.asset_materialization.metadata.items()}
                for r in records
            }

        meta, images, codes = (materializations(a) for a in ASSETS)
        assert set(meta) == set(images) == set(codes) == set(KEYS)
        layout = StorageLayout(str(storage))
        for shard, key in enumerate(KEYS):
            photos = sum("/img/" in u for u in urls[shard])
            m, i, c = meta[key], images[key], codes[key]
            assert m["dagster/row_count"] == SAMPLES
            assert m["path"] == layout.metadata_shard(shard)
            assert i["dagster/row_count"] == i["successes"] + i["failed_to_download"] + i["failed_to_resize"] == SAMPLES
            assert i["successes"] == photos
            assert sum(i["failures_by_reason"].values()) == SAMPLES - photos
            assert c["encoded"] == c["downloaded"] - c["undecodable"] == photos
            # the code parquet on storage, one row per encoded image, keys of its own shard
            table = pq.read_table(layout.code_shard(TINY_MODEL, shard))
            assert table.num_rows == c["encoded"]
            assert all(k.startswith(key) for k in table.column("key").to_pylist())
            assert all(len(code) == 2048 for code in table.column("code").to_pylist())

        # each run checked its own shards, one result per shard and check, all passed and current
        for check in SHARD_CHECK_KEYS:
            results = latest_results(instance, check)
            assert sorted(r.shard for r in results) == [f"{i:05d}" for i in range(NUM_SHARDS)], check
            assert all(r.passed and r.current for r in results), (check, results)
