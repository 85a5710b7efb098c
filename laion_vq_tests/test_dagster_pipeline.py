"""The whole chain through Dagster: metadata → img2dataset tars → VQGAN codes, 2 shards in one run,
against a loopback image server, a real instance (ephemeral, and PostgreSQL) and the tiny f8 model."""

from __future__ import annotations

import os

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from laion_vq.defs.assets import code_parquets, image_tars, raw_metadata_shards
from laion_vq.defs.check_state import CODES_CHECK, IMAGES_CHECK, latest_results
from laion_vq.defs.checks import SHARD_CHECKS
from laion_vq.defs.jobs import check_job
from laion_vq.defs.resources import (
    DownloaderResource,
    LaionMetadataResource,
    StorageResource,
    VQGANEncoderResource,
)
from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.demo_inputs import shard_urls
from laion_vq.testing.synthetic_metadata import write_parts

from .conftest import TINY_MODEL

SAMPLES = 10


@pytest.fixture()
def pipeline(tmp_path, image_server, tiny_checkpoint):
    """Definitions wired to a temp storage root and metadata parts (shard 0 in part 0, shard 1 in part 1)."""
    urls = shard_urls(image_server, 2, SAMPLES)
    write_parts(str(tmp_path / "meta"), urls, row_group_size=3)
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "metadata": LaionMetadataResource(source=str(tmp_path / "meta"), samples_per_shard=SAMPLES),
        "downloader": DownloaderResource(thread_count=8, timeout=5),
        "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=tiny_checkpoint, device="cpu", batch_size=4),
    }
    job = dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets])
    defs = dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets],
        asset_checks=SHARD_CHECKS,
        jobs=[job, check_job],
        resources=resources,
        executor=dg.in_process_executor,
    )
    return defs, StorageLayout(str(tmp_path / "data")), urls


def _run_two_shards(defs, instance):
    return defs.resolve_job_def("pipe").execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: "00001"},
    )


def _check(defs, instance) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    """Run the audit job (no partition: every shard) → {(check, shard): its evaluation}."""
    result = defs.resolve_job_def(check_job.name).execute_in_process(instance=instance, raise_on_error=False)
    return {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}


def _failure_text(result) -> str:
    """Every step failure's error message (a dg.Failure's description lands there)."""
    return " ".join(
        e.step_failure_data.error.to_string() for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    )


def _materializations(instance, asset: str) -> dict[str, dict]:
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    return {
        r.asset_materialization.partition: {k: v.value for k, v in r.asset_materialization.metadata.items()}
        for r in records
    }


def _assert_pipeline_outputs(instance, layout, urls):
    meta = _materializations(instance, "raw_metadata_shards")
    images = _materializations(instance, "image_tars")
    codes = _materializations(instance, "code_parquets")
    assert set(meta) == set(images) == set(codes) == {"00000", "00001"}
    for shard, key in enumerate(["00000", "00001"]):
        expected_photos = sum("/img/" in u for u in urls[shard])
        m, i, c = meta[key], images[key], codes[key]
        assert m["dagster/row_count"] == SAMPLES
        # metadata rows = successes + failures, and every photo URL succeeds
        assert i["dagster/row_count"] == i["successes"] + i["failed_to_download"] + i["failed_to_resize"] == SAMPLES
        assert i["successes"] == expected_photos
        assert sum(i["failures_by_reason"].values()) == SAMPLES - expected_photos
        # code rows = successes − undecodable
        assert c["encoded"] == c["downloaded"] - c["undecodable"] == i["successes"]
        # every partition's page says what made its codes
        assert (c["model"], c["dtype"], c["encode_mode"], c["index_rule"]) == (TINY_MODEL, "fp32", "exact", "argmax")
        # and how the run's pipeline went: throughput, how long the encoder waited for input, OOM retries
        assert c["run_images_per_second"] > 0 and 0 <= c["run_encoder_idle_share"] <= 1
        assert (c["run_batch_size"], c["run_oom_retries"]) == (4, 0)
        assert len(c["checkpoint_sha256"]) == 64 and c["checkpoint"].endswith(".ckpt")
        table = pq.read_table(layout.code_shard(TINY_MODEL, shard))
        assert table.num_rows == c["encoded"]
        assert read_codes_provenance(layout.code_shard(TINY_MODEL, shard))["encode_mode"] == "exact"
        keys = table.column("key").to_pylist()
        assert keys == sorted(keys) and all(k.startswith(key) for k in keys)
        for row in table.to_pylist():
            assert len(row["code"]) == 2048
            grid = np.frombuffer(row["code"], np.int16).reshape(32, 32)
            assert grid.min() >= 0 and grid.max() < 8192
            assert row["url"] in urls[shard] and row["caption"].startswith("a photo")
        status = pq.read_table(layout.image_status(shard))
        assert status.num_rows == SAMPLES
        # pictures users look at: a code-usage histogram per shard, reconstructions on a run's first and last
        # shard (the last is the asset's latest materialization, the page users land on); random weights said
        assert c["code_usage"].startswith("![code usage](data:image/png;base64,")
        assert c["samples_vs_reconstructions"].startswith("![originals (top) and reconstructions (bottom), ")
        assert "RANDOM weights: noise is expected" in c["samples_vs_reconstructions"]
        assert c["random_weights"] is True and "RANDOM WEIGHTS" in c["warning"]
        # machine data (the exact usage histogram) is in the parquet's footer, not on the page users read
        assert "code_usage_counts" not in c
        assert read_codes_provenance(c["path"])["code_usage"].startswith("u32z1:")


def test_two_shards_in_one_run_ephemeral_instance(pipeline):
    defs, layout, urls = pipeline
    with dg.instance_for_test() as instance:
        result = _run_two_shards(defs, instance)
        assert result.success
        _assert_pipeline_outputs(instance, layout, urls)
        # the checks ran inside the run: one evaluation per shard and check, each on its own partition
        in_run = {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}
        assert set(in_run) == {
            (c, k)
            for c in ("raw_metadata_shards_valid", "image_tars_complete", "code_parquets_contract", "no_removed_items")
            for k in ("00000", "00001")
        }
        assert all(e.passed for e in in_run.values())
        # the encoder's own checks come with it, evaluated by its one step (no check step to skip)
        one = dg.materialize([code_parquets], partition_key="00001", instance=instance, resources=defs.resources)
        assert sorted((e.check_name, e.partition) for e in one.get_asset_check_evaluations()) == [
            ("code_parquets_contract", "00001"),
            ("no_removed_items", "00001"),
        ]
        assert [e.step_key for e in one.all_events if e.event_type_value == "STEP_SUCCESS"] == ["code_parquets"]
        evaluations = _check(defs, instance)  # 4 check names (no_removed_items on two assets) × 2 shards
        assert len(evaluations) == 8 and all(e.passed for e in evaluations.values())
        assert evaluations[("image_tars_complete", "00000")].metadata["rows"].value == SAMPLES

        # corrupt shards on storage: each check fails on its shard only and names why; the good ones pass
        with open(layout.code_shard(TINY_MODEL, 1), "wb") as f:
            f.write(b"PAR1 truncated garbage")
        os.remove(layout.image_stats(0))
        evaluations = _check(defs, instance)
        failed = {key for key, e in evaluations.items() if not e.passed}
        assert failed == {("code_parquets_contract", "00001"), ("image_tars_complete", "00000")}
        assert evaluations[("image_tars_complete", "00000")].metadata["reason"].value == "stats json missing"
        assert evaluations[("code_parquets_contract", "00001")].description.startswith("unreadable parquet")
        # … and the instance holds exactly that per partition (what the check's Partitions page shows)
        codes_state = {r.shard: r.passed for r in latest_results(instance, CODES_CHECK)}
        images_state = {r.shard: r.passed for r in latest_results(instance, IMAGES_CHECK)}
        assert codes_state == {"00000": True, "00001": False} and images_state == {"00000": False, "00001": True}

        # a second run over the same shards replaces the files whole (atomic publish, no temp leftovers)
        assert _run_two_shards(defs, instance).success
        leftovers = [n for n in os.listdir(os.path.dirname(layout.code_shard(TINY_MODEL, 0))) if ".tmp-" in n]
        assert leftovers == []
        assert all(e.passed for e in _check(defs, instance).values())


def test_shard_beyond_metadata_fails_with_clear_message(pipeline):
    defs, _, _ = pipeline
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [raw_metadata_shards],
            partition_key="00005",
            instance=instance,
            resources={"storage": defs.resources["storage"], "metadata": defs.resources["metadata"]},
            raise_on_error=False,
        )
        assert not result.success
        assert "make 2 shard(s) (00000 … 00001)" in _failure_text(result)


def test_missing_checkpoint_is_a_clear_failure(pipeline, tmp_path):
    defs, _, _ = pipeline
    with dg.instance_for_test() as instance:
        assert _run_two_shards(defs, instance).success
        result = dg.materialize(
            [code_parquets],
            partition_key="00000",
            instance=instance,
            resources={
                "storage": defs.resources["storage"],
                "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=None),
            },
            raise_on_error=False,
        )
        assert not result.success
        assert "LAION_VQ_CHECKPOINT" in _failure_text(result)


def test_two_shards_on_postgres_instance(pipeline, postgres_instance):
    defs, layout, urls = pipeline
    assert type(postgres_instance.run_storage).__name__ == "PostgresRunStorage"
    result = _run_two_shards(defs, postgres_instance)
    assert result.success
    _assert_pipeline_outputs(postgres_instance, layout, urls)
    run = postgres_instance.get_run_by_id(result.run_id)
    assert run.tags[ASSET_PARTITION_RANGE_START_TAG] == "00000"
    # the per-shard numbers live on each partition's own materialization, read back from PostgreSQL
    codes = _materializations(postgres_instance, "code_parquets")
    assert codes["00000"]["path"].endswith("00000.parquet") and codes["00001"]["path"].endswith("00001.parquet")


def test_one_bad_shard_fails_the_run_but_keeps_the_good_ones(tmp_path, image_server):
    """Shard 00001 is beyond a one-shard metadata source: 00000 is recorded, 00001 is named as failed."""
    write_parts(str(tmp_path / "meta"), shard_urls(image_server, 1, SAMPLES))
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "metadata": LaionMetadataResource(source=str(tmp_path / "meta"), samples_per_shard=SAMPLES),
    }
    job = dg.define_asset_job("slice_only", selection=[raw_metadata_shards])
    defs = dg.Definitions(assets=[raw_metadata_shards], jobs=[job], resources=resources)
    with dg.instance_for_test() as instance:
        result = _run_two_shards_of(defs, "slice_only", instance)
        assert not result.success
        assert "1 of 2 shard(s) failed: 00001: ShardOutOfRange" in _failure_text(result)
        assert set(_materializations(instance, "raw_metadata_shards")) == {"00000"}
        assert (tmp_path / "data" / "metadata" / "00000.parquet").exists()
        assert not (tmp_path / "data" / "metadata" / "00001.parquet").exists()


def test_a_failed_download_step_still_checks_the_tars_it_recorded(pipeline):
    """Shard 00001 has no metadata shard, so the download step fails after recording 00000; the run's check steps
    are then skipped, so the step evaluates 00000's tar checks itself: current, passed (else the encoder would never
    be fed that shard, and the backfill's retry of 00001 would not check it either)."""
    defs, layout, _urls = pipeline
    with dg.instance_for_test() as instance:
        meta_only = dg.materialize(
            [raw_metadata_shards],
            partition_key="00000",
            instance=instance,
            resources={"storage": defs.resources["storage"], "metadata": defs.resources["metadata"]},
        )
        assert meta_only.success
        job = dg.define_asset_job(
            "tars", selection=dg.AssetSelection.assets(image_tars) | dg.AssetSelection.checks_for_assets(image_tars)
        )
        result = (
            dg.Definitions(
                assets=[raw_metadata_shards, image_tars],
                asset_checks=SHARD_CHECKS[1:2],
                jobs=[job],
                resources=defs.resources,
                executor=dg.in_process_executor,
            )
            .resolve_job_def("tars")
            .execute_in_process(
                instance=instance,
                tags={ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: "00001"},
                raise_on_error=False,
            )
        )
        assert not result.success
        assert "1 of 2 shard(s) failed: 00001" in _failure_text(result)
        assert set(_materializations(instance, "image_tars")) == {"00000"}
        [checked] = latest_results(instance, IMAGES_CHECK, ["00000", "00001"])
        assert (checked.shard, checked.passed, checked.current) == ("00000", True, True), checked


def _run_two_shards_of(defs, job_name, instance):
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: "00000", ASSET_PARTITION_RANGE_END_TAG: "00001"},
        raise_on_error=False,
    )
