"""A non-LAION source through Dagster: COYO-700M's columns in JSON lines, a filter, the shard checks and the
provenance, on a real (ephemeral) instance with the loopback image server and the tiny f8 model."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from laion_vq.defs.assets import code_parquets, image_tars, raw_metadata_shards
from laion_vq.defs.checks import SHARD_CHECKS
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.download.img2dataset_shard import expected_key
from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.sources import preset
from laion_vq.shards.storage import StorageLayout
from laion_vq.testing.source_parts import write_source_part

from .conftest import TINY_MODEL

SAMPLES = 8
FILTER = "extra_int <> 1 AND watermark_score IS NOT NULL"


def test_coyo_jsonl_with_a_filter_through_dagster(tmp_path, image_server, tiny_checkpoint):
    fmt = preset("coyo700m").with_overrides(input_format="jsonl")
    urls = [image_server.url(p) for p in image_server.photo_paths()[:3]]
    (tmp_path / "coyo").mkdir()
    written = write_source_part(fmt, urls, str(tmp_path / "coyo" / "part-0.jsonl"))
    assert written.column("extra_int").to_pylist()[1] == 1  # the row the filter rejects
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "metadata": LaionMetadataResource(
            source=str(tmp_path / "coyo"),
            samples_per_shard=SAMPLES,
            format="coyo700m",
            input_format="jsonl",
            row_filter=FILTER,
        ),
        "downloader": DownloaderResource(thread_count=4, timeout=5),
        "encoder": VQGANEncoderResource(model=TINY_MODEL, checkpoint=tiny_checkpoint, device="cpu", batch_size=4),
    }
    defs = dg.Definitions(
        assets=[raw_metadata_shards, image_tars, code_parquets],
        asset_checks=SHARD_CHECKS,
        jobs=[dg.define_asset_job("pipe", selection=[raw_metadata_shards, image_tars, code_parquets])],
        resources=resources,
        executor=dg.in_process_executor,
    )
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("pipe").execute_in_process(instance=instance, partition_key="00000")
        assert result.success
        checks = {(e.check_name, e.partition): e for e in result.get_asset_check_evaluations()}
        # the blocking checks of the run, each on shard 00000
        assert checks and all(e.passed for e in checks.values()), {k: e.metadata for k, e in checks.items()}
        meta = instance.fetch_materializations(dg.AssetKey("raw_metadata_shards"), limit=1).records[0]
        assert meta.asset_materialization.metadata["filtered"].value == 1
    layout = StorageLayout(str(tmp_path / "data"))
    assert list((tmp_path / "data" / "metadata" / "_index").iterdir())  # the JSON lines part was indexed once
    status = {row["key"]: row for row in pq.read_table(layout.image_status(0)).to_pylist()}
    assert status[expected_key(0, 1, SAMPLES)]["status"] == "filtered"
    assert status[expected_key(0, 1, SAMPLES)]["failure_reason"] == FILTER
    codes = pq.read_table(layout.code_shard(TINY_MODEL, 0))
    assert codes.num_rows == 2
    # COYO's own `width`/`height` (img2dataset's names) kept beside the list column, with their types
    assert codes.schema.field("source_width").type == written.schema.field("width").type
    assert codes.schema.field("extra_list").type == pa.list_(pa.int64())
    provenance = read_codes_provenance(layout.code_shard(TINY_MODEL, 0))
    assert (provenance["source_format"], provenance["filter"]) == ("coyo700m", FILTER)
    assert (provenance["model"], provenance["image_size"], provenance["grid"]) == (TINY_MODEL, 256, 32)
