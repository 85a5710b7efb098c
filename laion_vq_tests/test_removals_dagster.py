"""Removal lists through Dagster: four shards go through the real pipeline (loopback downloads, the tiny encoder,
a real instance); two lists (CSV by key, parquet by sample id, plus an item matching nothing) are dropped
under `removals/`. The sensor sees them, `removal_lists` shows them pending, `apply_removals` rewrites just
the two shards holding listed items and records it on their partitions, the checks pass, the report and the
card count the removals; a tar restored from a backup fails `no_removed_items`; a second apply is a no-op."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from laion_vq.defs.assets import code_parquets, corrupted_shards_report, image_tars, raw_metadata_shards
from laion_vq.defs.check_state import REMOVED_IMAGES_CHECK
from laion_vq.defs.checks import SHARD_CHECKS
from laion_vq.defs.jobs import check_job
from laion_vq.defs.removals import apply_removals, removal_lists, removal_lists_sensor
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.download.img2dataset_shard import expected_key
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.demo_inputs import shard_urls
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

SHARDS, SAMPLES = 4, 6


def _defs(tmp_path: Path, image_server, checkpoint: str) -> dg.Definitions:
    urls = shard_urls(image_server, SHARDS, SAMPLES)
    write_parts(str(tmp_path / "meta"), [sum(urls, [])])
    return dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets, corrupted_shards_report, removal_lists],
        asset_checks=SHARD_CHECKS,
        jobs=[
            dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets]),
            check_job,
            dg.define_asset_job("report", selection=[corrupted_shards_report]),
            dg.define_asset_job("lists", selection=[removal_lists]),
            apply_removals,
        ],
        sensors=[removal_lists_sensor],
        resources={
            "storage": StorageResource(root=str(tmp_path / "data")),
            "metadata": LaionMetadataResource(source=str(tmp_path / "meta"), samples_per_shard=SAMPLES),
            "downloader": DownloaderResource(thread_count=8, timeout=5),
            "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=checkpoint, device="cpu", batch_size=8),
        },
        executor=dg.in_process_executor,
    )


def _success_row(layout: StorageLayout, shard: int, index: int = 0) -> dict:
    rows = [r for r in pq.read_table(layout.image_status(shard)).to_pylist() if r["status"] == "success"]
    return rows[index]


def _files(layout: StorageLayout, shard: int) -> dict[str, tuple[bytes, int]]:
    paths = [layout.image_tar(shard), layout.image_status(shard), layout.code_shard(TINY_MODEL, shard)]
    return {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) for p in paths}


def _meta(instance: dg.DagsterInstance, asset: str, shard: str) -> dict:
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[shard]), limit=1
    ).records[0]
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def _latest_metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    record = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records[0]
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@contextlib.contextmanager
def _first_shards_made(tmp_path, image_server, tiny_checkpoint) -> Iterator[tuple]:
    """Definitions, layout and a SQLite instance on which the pipeline made every shard but the last (downloaded
    later, after the lists arrive)."""
    defs = _defs(tmp_path, image_server, tiny_checkpoint)
    layout = StorageLayout(str(tmp_path / "data"))
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        tags = {ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: f"{SHARDS - 2:05d}"}
        assert defs.resolve_job_def("pipe").execute_in_process(instance=instance, tags=tags).success
        yield defs, layout, instance


def test_lists_are_applied_through_dagster(tmp_path, image_server, tiny_checkpoint):
    # shards 0-2 now; shard 3 is downloaded after the lists arrive, and its listed row is never requested
    with _first_shards_made(tmp_path, image_server, tiny_checkpoint) as (defs, layout, instance):
        later = pq.read_table(tmp_path / "meta").to_pylist()[3 * SAMPLES + 2]  # shard 3's third row, in the source

        by_key, by_id = _success_row(layout, 1), _success_row(layout, 2, 1)
        (tmp_path / "data" / "removals").mkdir()
        (tmp_path / "data" / "removals" / "takedown.csv").write_text(
            f"key,reason,date\n{by_key['key']},takedown request 17,2026-11-30\n"
            "999990001,a key no shard holds,2026-11-30\n"
        )
        pq.write_table(
            pa.table(
                {
                    "sample_id": [str(by_id["SAMPLE_ID"]), str(later["SAMPLE_ID"])],
                    "reason": ["opt-out registry", "opt-out registry"],
                    "date": ["2026-12-01", "2026-12-02"],
                }
            ),
            tmp_path / "data" / "removals" / "optout.parquet",
        )
        untouched = {shard: _files(layout, shard) for shard in (0,)}
        backup = tmp_path / "backup-00001.tar"
        shutil.copy(layout.image_tar(1), backup)

        # the sensor sees new lists once
        sensor = defs.resolve_sensor_def("removal_lists_sensor")
        with dg.build_sensor_context(instance=instance, resources={"storage": defs.resources["storage"]}) as context:
            first = sensor(context)
            assert isinstance(first, dg.RunRequest) and first.run_key.startswith("apply-"), first
            assert isinstance(sensor(context), dg.SkipReason)  # same lists, same cursor: nothing to do

        lists = defs.resolve_job_def("lists").execute_in_process(instance=instance)
        mat = instance.fetch_materializations(dg.AssetKey("removal_lists"), limit=1).records[0].asset_materialization
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert lists.success and meta["list_count"] == 2 and meta["listed_items"] == 4 and meta["broken_lists"] == []
        # shard 3 is not downloaded: its item matches nothing yet, as does the key no shard holds
        assert meta["pending_shards"] == 2 and meta["pending_keys"] == 2 and meta["listed_items_matching_nothing"] == 2
        assert "| `takedown.csv` |" in meta["lists"] and "pending" in meta["lists"]

        applied = defs.resolve_job_def("apply_removals").execute_in_process(instance=instance)
        assert applied.success
        # just the two shards: their partitions record it, the others keep their bytes and mtimes
        for shard, key, reason in (("00001", by_key["key"], "takedown request 17"), ("00002", by_id["key"], None)):
            tars = _meta(instance, "image_tars", shard)
            assert tars["removed"] == 1 and tars["removal_lists"], tars
            [item] = tars["removed_items"]
            listed = "takedown.csv" if reason else "optout.parquet"
            assert item == {"key": key, "list": listed, "reason": reason or "opt-out registry"}
            assert "samples_vs_reconstructions" not in _meta(instance, "code_parquets", shard)
            status = {r["key"]: r for r in pq.read_table(layout.image_status(int(shard))).to_pylist()}
            assert status[key]["status"] == "removed"
            assert status[key]["failure_reason"] == (reason or "opt-out registry")
            codes = pq.read_table(layout.code_shard(TINY_MODEL, int(shard))).column("key").to_pylist()
            assert key not in codes
        assert {shard: _files(layout, shard) for shard in (0,)} == untouched
        evaluations = applied.get_asset_check_evaluations()
        assert evaluations and all(e.passed for e in evaluations), [e.description for e in evaluations if not e.passed]

        # shard 3 arrives: its listed row is withheld from the download, recorded removed with the list's reason
        requests = len(image_server.hits) if hasattr(image_server, "hits") else None
        three = defs.resolve_job_def("pipe").execute_in_process(instance=instance, partition_key="00003")
        assert three.success
        status = pq.read_table(layout.image_status(3)).to_pylist()
        assert [(r["status"], r["failure_reason"]) for r in status][2] == ("removed", "opt-out registry")
        three_meta = _meta(instance, "image_tars", "00003")
        assert three_meta["removed"] == 1
        assert three_meta["removed_items"] == [
            {"key": status[2]["key"], "list": "optout.parquet", "reason": "opt-out registry"}
        ]
        if requests is not None:
            assert len(image_server.hits) - requests == SAMPLES - 1  # one request per row but the listed one

        # every check passes on every shard; the report and the card count the removals
        audit = defs.resolve_job_def(check_job.name).execute_in_process(instance=instance)
        assert audit.success and all(e.passed for e in audit.get_asset_check_evaluations())
        assert defs.resolve_job_def("report").execute_in_process(instance=instance).success
        report = {
            k: v.value
            for k, v in instance.fetch_materializations(dg.AssetKey("corrupted_shards_report"), limit=1)
            .records[0]
            .asset_materialization.metadata.items()
        }
        assert report["images_removed"] == 3 and report["corrupted_shards"] == 0
        card = Path(layout.dataset_card(TINY_MODEL)).read_text()
        assert "## Cleaned against removal lists" in card and "| `optout.parquet` |" in card
        # as the report counts them: 2 taken out by applying lists, shard 3's item never downloaded
        assert "3 item(s) were removed" in card and "2 taken out of shards already made, 1 never downloaded" in card

        # a second apply changes nothing
        before = {shard: _files(layout, shard) for shard in range(SHARDS)}
        assert defs.resolve_job_def("apply_removals").execute_in_process(instance=instance).success
        assert {shard: _files(layout, shard) for shard in range(SHARDS)} == before

        # a tar restored from an old backup still holds the removed image: no_removed_items fails on that shard
        shutil.copy(backup, layout.image_tar(1))
        audit = defs.resolve_job_def(check_job.name).execute_in_process(instance=instance, raise_on_error=False)
        failed = {
            (e.asset_key, e.check_name, e.partition): e for e in audit.get_asset_check_evaluations() if not e.passed
        }
        restored = failed[(REMOVED_IMAGES_CHECK.asset_key, REMOVED_IMAGES_CHECK.name, "00001")]
        assert restored.metadata["reason"].value == "removed item in tar"
        assert by_key["key"] in restored.description


def _footer_rows(layout: StorageLayout, shard: int) -> int:
    return pq.ParquetFile(layout.code_shard(TINY_MODEL, shard)).metadata.num_rows


def _statuses(layout: StorageLayout, shard: int) -> list[str]:
    return pq.read_table(layout.image_status(shard), columns=["status"]).column("status").to_pylist()


def test_after_an_apply_partitions_report_and_card_agree_with_the_files(tmp_path, image_server, tiny_checkpoint):
    """The issue's case: a takedown list beside a list with a misspelt column. The good list is applied in full
    (two items of a shard already made, one item withheld from a later download), the bad one nowhere and
    named by `removal_lists_parse`; then every count on the partitions, in the report and in the card is the
    files' count: the status parquets' statuses and the code parquets' footers."""
    with _first_shards_made(tmp_path, image_server, tiny_checkpoint) as (defs, layout, instance):
        first, second = _success_row(layout, 1, 0)["key"], _success_row(layout, 1, 1)["key"]
        later = expected_key(SHARDS - 1, 1, SAMPLES)  # shard 3's second row, downloaded after the list: withheld
        before = {"encoded": _meta(instance, "code_parquets", "00001")["encoded"], "rows": _footer_rows(layout, 1)}
        removals = tmp_path / "data" / "removals"
        removals.mkdir()
        (removals / "takedown.csv").write_text(
            "key,reason,date\n" + "".join(f"{k},takedown request 77,2026-11-30\n" for k in (first, second, later))
        )
        (removals / "bad.csv").write_text(f"key,reasn,date\n{_success_row(layout, 2)['key']},typo,2026-11-30\n")

        applied = defs.resolve_job_def("apply_removals").execute_in_process(instance=instance)
        assert applied.success  # the bad list does not hold up the good one
        statuses = _statuses(layout, 1)
        assert statuses.count("removed") == 2 and _footer_rows(layout, 1) == before["rows"] - 2
        assert "removed" not in _statuses(layout, 2)  # nothing from bad.csv
        [parse] = [e for e in applied.get_asset_check_evaluations() if e.check_name == "removal_lists_parse"]
        assert not parse.passed and "bad.csv: line 1 (header): unknown column(s) ['reasn']" in parse.description
        assert "the other lists are applied" in parse.description
        lists = _latest_metadata(instance, "removal_lists")
        assert [b["list"] for b in lists["broken_lists"]] == ["bad.csv"] and lists["list_count"] == 1
        assert "| `bad.csv` |" in lists["lists"] and "does not parse" in lists["lists"]
        assert lists["keys_removed_after_download"] == 2 and lists["listed_items_matching_nothing"] == 1

        # the asset itself says the same when materialized on its own
        alone = defs.resolve_job_def("lists").execute_in_process(instance=instance, raise_on_error=False)
        [parse] = [e for e in alone.get_asset_check_evaluations() if e.check_name == "removal_lists_parse"]
        assert not parse.passed and "bad.csv: line 1" in parse.description

        # a download still refuses to run beside a list that does not parse (what it names must never be
        # fetched): the operator takes the bad list away
        (removals / "bad.csv").unlink()
        assert defs.resolve_job_def("pipe").execute_in_process(instance=instance, partition_key="00003").success
        assert defs.resolve_job_def("report").execute_in_process(instance=instance).success

        totals = {"rows": 0, "downloaded": 0, "removed": 0, "encoded": 0}
        for shard in range(SHARDS):
            key, statuses = f"{shard:05d}", _statuses(layout, shard)
            successes, removed = statuses.count("success"), statuses.count("removed")
            tars, codes = _meta(instance, "image_tars", key), _meta(instance, "code_parquets", key)
            assert (tars["dagster/row_count"], tars["successes"], tars["removed"]) == (
                len(statuses),
                successes,
                removed,
            ), key
            assert tars["success_rate"] == round(successes / (len(statuses) - removed), 4), key
            assert (codes["dagster/row_count"], codes["encoded"]) == (_footer_rows(layout, shard),) * 2, key
            assert codes["downloaded"] == successes, key
            totals["rows"] += len(statuses)
            totals["downloaded"] += successes
            totals["removed"] += removed
            totals["encoded"] += _footer_rows(layout, shard)
        assert totals["removed"] == 3
        after = _meta(instance, "code_parquets", "00001")
        assert (after["encoded"], after["removed"]) == (before["encoded"] - 2, 2)
        assert _meta(instance, "image_tars", "00001")["removed_items"] == [
            {"key": k, "list": "takedown.csv", "reason": "takedown request 77"} for k in sorted((first, second))
        ]
        assert _meta(instance, "image_tars", "00003")["removed_items"] == [
            {"key": later, "list": "takedown.csv", "reason": "takedown request 77"}
        ]

        report = _latest_metadata(instance, "corrupted_shards_report")
        assert (report["images_downloaded"], report["codes"], report["images_removed"]) == (
            totals["downloaded"],
            totals["encoded"],
            totals["removed"],
        )
        rate = totals["downloaded"] / (totals["rows"] - totals["removed"])
        assert report["overall_success_rate"] == round(rate, 4)
        assert report["codes"] <= report["images_downloaded"]
        summary = report["summary"]
        assert (
            f"{totals['downloaded']} of {totals['rows']} images downloaded ({rate:.1%} of those not removed)" in summary
        )
        assert f"{totals['encoded']} encoded" in summary and "3 removed by removal lists" in summary

        card = Path(layout.dataset_card(TINY_MODEL)).read_text()
        assert (
            f"Their images: {totals['rows']} in the metadata, {totals['downloaded']} downloaded ({rate:.2%} of the "
            f"{totals['rows'] - totals['removed']} not removed or filtered), {totals['encoded']} encoded."
        ) in card
        assert "3 item(s) were removed" in card and "2 taken out of shards already made, 1 never downloaded" in card
        assert "| `takedown.csv` |" in card
